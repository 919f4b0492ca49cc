# Scratch measurement of 2026-12-06 (docs/bench/cpu-step-2026-12-06/results.txt); run from the repository root.
import time, statistics, torch
torch.set_num_threads(2)
def bench(f, n=50):
    f(); ts=[]
    for _ in range(5):
        t=time.perf_counter()
        for _ in range(n): f()
        ts.append((time.perf_counter()-t)/n)
    return statistics.median(ts)
for (c_in,c_out,hw) in [(32,32,14),(32,64,14),(64,64,7)]:
    for dt in [torch.float32, torch.bfloat16]:
        x=torch.randn(64,c_in,hw,hw,dtype=dt).to(memory_format=torch.channels_last).requires_grad_()
        conv=torch.nn.Conv2d(c_in,c_out,3,padding=1,bias=False).to(dt).to(memory_format=torch.channels_last)
        def f():
            y=conv(x); y.backward(torch.ones_like(y))
        s=bench(f)
        flop=2*3*64*hw*hw*c_in*c_out*9
        print(c_in,c_out,hw,dt, f"{s*1e3:.2f} ms fwd+bwd  {flop/s/1e9:.0f} GFLOP/s")
