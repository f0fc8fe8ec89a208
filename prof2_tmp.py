import time, numpy as np, jax, jax.numpy as jnp, os
x = np.random.default_rng(0).standard_normal((8192, 512)).astype(np.float32)
xd = jnp.asarray(x)
mm = jax.jit(lambda a, b: jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
for i in range(3):
    s=time.perf_counter(); jax.block_until_ready(mm(xd, xd)); a=time.perf_counter()-s
    s=time.perf_counter(); x @ x.T; b=time.perf_counter()-s
    print(f"xla {a:.3f} numpy {b:.3f} load {os.getloadavg()[0]:.1f}")
np.show_config()
