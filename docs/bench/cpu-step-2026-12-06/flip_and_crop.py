# Scratch measurement of 2026-12-06 (docs/bench/cpu-step-2026-12-06/results.txt); run from the repository root.
import time, statistics
import numpy as np, jax, jax.numpy as jnp
from xpcnn.data.augment import flip_and_crop
from xpcnn.ops.fastpath_jax import CPU_COMPILER_OPTIONS
B=64
rng=np.random.default_rng(0)
x=jnp.asarray(rng.standard_normal((B,1,28,28)).astype(np.float32))
flips=jnp.asarray(rng.random(B)<0.5); tops=jnp.asarray(rng.integers(0,5,B)); lefts=jnp.asarray(rng.integers(0,5,B))

def ref(x,f,t,l): return flip_and_crop(x,f,t,l,2,-0.4)
def mm(x,f,t,l):
    b,c,h,w=x.shape; p=2
    # R[b,i,k]=1 where source row k = i + t - p; C[b,k,j]=1 where source col k for output col j (flip applied)
    i=jnp.arange(h)
    src_r = i[None,:] + (t-p)[:,None]                     # (B,H)
    R = (src_r[:,:,None] == jnp.arange(h)[None,None,:]).astype(x.dtype)   # (B,H,H)
    j=jnp.arange(w)
    src_c = j[None,:] + (l-p)[:,None]
    src_c = jnp.where(f[:,None], (w-1)-src_c, src_c)
    C = (jnp.arange(w)[None,:,None] == src_c[:,None,:]).astype(x.dtype)   # (B,W,W): C[b,k,j]
    y = jnp.einsum('bik,bckl,blj->bcij', R, x, C, precision=jax.lax.Precision.HIGHEST)
    inside = jnp.einsum('bik,blj->bij', R, C)[:,None]   # 1 inside
    return jnp.where(inside>0, y, -0.4)
for name,fn in [("take",ref),("matmul",mm)]:
    c=jax.jit(fn).lower(x,flips,tops,lefts).compile(compiler_options=CPU_COMPILER_OPTIONS)
    out=c(x,flips,tops,lefts); out.block_until_ready()
    ts=[]
    for _ in range(7):
        t=time.perf_counter()
        for _ in range(200): out=c(x,flips,tops,lefts)
        out.block_until_ready(); ts.append((time.perf_counter()-t)/200*1e6)
    print(name, f"{statistics.median(ts):.1f} us", np.array_equal(np.asarray(out), np.asarray(jax.jit(ref)(x,flips,tops,lefts))))
