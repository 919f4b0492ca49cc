"""The stateless core: a model run as a function of its state, and the one training step and evaluation step.

Layers keep their state on ``self`` (parameters, buffers, what forward keeps for
backward, a generator).  As Keras 3's ``stateless_call``, :func:`lent` lends a
model, every layer of nested containers included, to one computation that
is *given* the parameters and buffers and *returns* the new ones; every
attribute of every layer is restored afterwards, so nothing of the
computation (traced arrays, caches) outlives it:

* :func:`stateless_forward` (parameters, buffers, x, mode, generator) -> (y, new buffers);
* :func:`stateless_gradients` (parameters, buffers, x, labels, generator) -> (loss, logits, gradients,
  new buffers): forward, loss and the layers' backward.

:class:`Step` builds the one training step on them,
``train(state, images, labels, batch, generator, lr, count) -> (new state, metrics)``,
where the state is the pytree :class:`TrainState` (the optimiser's flat parameters and
slots, the model's buffers), and the one evaluation step.  Both are pure functions of
their arguments on JAX: :mod:`xpcnn.training.compiled` compiles them as they are; the eager runner
(:class:`xpcnn.training.train.LayerSteps`) wraps them in place, reading the state from the model and
optimiser (:meth:`Step.state`) and writing it back (:meth:`Step.adopt`).  On NumPy, CuPy and
torch the update writes into the flat buffer the model's parameters view (see
:mod:`xpcnn.optim`).

``lr`` and ``count`` (the optimiser step including this one) may be traced values, and
the noise comes from the ``generator`` argument, so a scan over steps can carry the state
and derive each step's generator from a key.  With several ranks the gradient is all-reduced
at one line of :meth:`Step.train`, between the gradients and the update.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, NamedTuple

from ..backends.backend import namespace
from ..backends.distributed import Local
from ..nn import CrossEntropyLoss, Layer


class TrainState(NamedTuple):
    """What a training step reads and returns (a JAX pytree: a named tuple of arrays and dicts of arrays)."""

    params: Any  # (P,) the optimiser's flat parameters; None for a model without parameters
    slots: dict  # {slot: (P,)} the optimiser's state, every live slot
    buffers: dict  # {name: array} the model's buffers (batch norm's running statistics)


class Metrics(NamedTuple):
    """A training step's mean loss over the batch and its number of correct predictions (0-d arrays)."""

    loss: Any
    correct: Any


def compiles(backend_name: str, eager: bool) -> bool:
    """Whether a run on backend ``backend_name`` runs its steps as compiled programs (JAX, unless ``eager``)."""
    return backend_name == "jax" and not eager


@contextlib.contextmanager
def lent(model: Layer):
    """Lend ``model`` to one computation, then restore every attribute of every layer in it as it was.

    Inside, each layer that holds state has its own copies of the ``params``, ``grads`` (empty) and
    ``buffers`` dicts, so what the computation assigns never reaches the caller's model.
    """
    modules = list(model.modules())
    saved = [dict(vars(module)) for module in modules]
    for _, layer in model._holders():
        layer.params, layer.grads, layer.buffers = dict(layer.params), {}, dict(layer.buffers)
    try:
        yield model
    finally:
        for module, attributes in zip(modules, saved, strict=True):
            vars(module).clear()
            vars(module).update(attributes)


def stateless_forward(model: Layer, parameters: dict, buffers: dict, x, training: bool, generator=None):
    """(``model(x)``, new buffers) with ``parameters`` and ``buffers`` named as ``model.named_parameters()``."""
    with lent(model):
        model.train(training)
        model.set_parameters(parameters)
        model.set_buffers(buffers)
        if generator is not None:
            model.set_generator(generator)
        return model.forward(x), dict(model.named_buffers())


def stateless_gradients(model: Layer, loss_fn: CrossEntropyLoss, parameters: dict, buffers: dict, x, y, generator):
    """Training mode: (mean loss 0-d, logits (N, K), ``{name: gradient}``, new buffers) for ``x``, labels ``y``."""
    loss_fn = copy.copy(loss_fn)  # it keeps the gradient of its last loss
    with lent(model):
        model.train()
        model.set_parameters(parameters)
        model.set_buffers(buffers)
        model.set_generator(generator)
        logits = model.forward(x)
        loss = loss_fn.forward(logits, y)
        model.backward(loss_fn.backward(), input_grad=False)
        return loss, logits, dict(model.named_gradients()), dict(model.named_buffers())


class Step:
    """The training and evaluation steps of ``model`` with ``loss_fn`` and ``optimizer``'s update rule.

    ``augmentation(x, generator, fill=background)`` (or None) transforms each training batch.
    With a ``communicator`` of several ranks (:mod:`xpcnn.backends.distributed`) each step's gradient is the mean of
    the ranks' (batch norm's statistics are the model's layers' business: ``model.set_communicator``).
    The model and optimiser hold the state between steps; the steps themselves only read their settings
    (layer shapes, hyperparameters, the flat buffer's layout).
    """

    def __init__(
        self, model: Layer, loss_fn: CrossEntropyLoss, optimizer, augmentation=None, background=0.0, communicator=None
    ):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.augmentation, self.background = augmentation, background
        self.communicator = communicator or Local()

    def state(self) -> TrainState:
        """The model's and optimiser's current state."""
        flat, slots = self.optimizer.flat_state()
        return TrainState(flat, slots, dict(self.model.named_buffers()))

    def adopt(self, state: TrainState, parameters: dict | None = None, steps: int = 1) -> None:
        """Make ``state``, ``steps`` steps on, the model's and optimiser's.

        ``parameters``: ``split(state.params)`` where the step made it."""
        self.optimizer.advance(state.params, state.slots, parameters, steps)
        self.model.set_buffers(state.buffers)

    def train(self, state: TrainState, images, labels, batch, generator, lr, count) -> tuple[TrainState, Metrics]:
        """One optimiser step on ``images[batch]`` (B, 1, 28, 28), ``labels[batch]`` (B,).

        ``generator`` draws the augmentation's and dropout's noise; ``lr`` is the learning rate and
        ``count`` the optimiser step including this one.
        """
        xp = namespace(images)
        x = xp.take(images, batch, axis=0)
        y = xp.take(labels, batch, axis=0)
        if self.augmentation is not None:
            x = self.augmentation(x, generator, fill=self.background)
        parameters = {} if state.params is None else self.optimizer.split(state.params)
        loss, logits, grads, buffers = stateless_gradients(
            self.model, self.loss_fn, parameters, state.buffers, x, y, generator
        )
        flat, slots = state.params, state.slots
        if flat is not None:
            pieces = self.optimizer.gradient_pieces(grads)
            if self.communicator.world_size > 1:  # data parallel: one all-reduce of the flat gradient
                pieces = [self.communicator.all_reduce_mean(xp.concat(pieces))]
            flat, slots = self.optimizer.update(flat, pieces, slots, lr, count)
        correct = xp.count_nonzero(xp.argmax(logits, axis=1) == y)  # count_nonzero counts the booleans
        return TrainState(flat, slots, buffers), Metrics(loss, correct)

    def evaluate(self, parameters: dict, buffers: dict, x, y):
        """Evaluation mode: (float64 sum of the losses 0-d, predictions (N,)) for ``x`` (N, 1, 28, 28), ``y`` (N,)."""
        xp = namespace(x)
        logits, _ = stateless_forward(self.model, parameters, buffers, x, training=False)
        loss = CrossEntropyLoss(check_labels=False).forward(logits, y)
        return xp.astype(loss, xp.float64) * y.shape[0], xp.argmax(logits, axis=1)
