import time, numpy as np, jax, jax.numpy as jnp
from bench.diffusion import make_data
from jretrieval import diffusion as d
q, db, ql, dl = make_data(5063, "overlapping")
x = np.concatenate([q, db]); m = len(x)
T, kd = 1000, 50
rows = d._default_rows(m, None); print("rows", rows, "load", __import__("os").getloadavg())
def t(f, *a, n=2, **k):
    for i in range(n):
        s = time.perf_counter(); out = jax.block_until_ready(f(*a, **k)); e = time.perf_counter() - s
    return out, e
xd = jnp.asarray(x)
mm = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
print("gemm full", t(mm, xd, xd)[1])
stride, rank = d._sample_plan(m, T); print("stride", stride, rank)
def thr_all():
    outs = []
    for s0 in range(0, m, rows):
        qq = jnp.asarray(np.pad(x[s0:s0+rows], ((0, max(0, s0+rows-m)), (0, 0))))
        outs.append(d._threshold_block(qq, xd, jnp.arange(s0, s0+rows, dtype=jnp.int32), rank=rank, stride=stride))
    return outs
print("threshold blocks", t(thr_all)[1])
print("neighbours", t(d._neighbours, x, T, kd)[1])
print("rank joint", t(d.rank, q, db, truncation=T, kd=kd)[1])
