"""Expert-parallel sharding: 8 fake CPU devices give the same logits as one device."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from prism_jax.sharding import _spec

SCRIPT = textwrap.dedent("""
    import jax
    import numpy as np
    from prism_jax.sharding import expert_mesh, shard_model
    from tests.test_runtime import CONFIG, random_partition
    from prism_jax.testing import random_params
    from prism_jax.model import PrismModel

    assert len(jax.devices()) == 8, jax.devices()
    params = random_params(CONFIG, seed=0, scale=8.0)
    toks = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (2, 16)).astype(np.int32)
    for backend, partition in [(b, p) for b in ("native", "tiled") for p in (None, random_partition(CONFIG, 4))]:
        model = PrismModel(CONFIG, params, partition=partition, backend=backend)
        budgets = [None] if partition is None else [None, 3, 6]
        single = {b: np.asarray(model(toks, budget=b)) for b in budgets}
        shard_model(model, expert_mesh(8))
        spec = model.state["layers"][0]["mlp"]["gate"][...].sharding.spec
        assert spec[0] == "expert", spec
        for b in budgets:
            err = np.abs(np.asarray(model(toks, budget=b)) - single[b]).max()
            assert err <= 1e-5, (backend, b, err)
    print("SHARDING OK")
""")


def test_eight_devices_match_one():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "SHARDING OK" in result.stdout


def test_indivisible_group_count_raises():
  class ThreeDeviceMesh:
    shape = {"expert": 3}

  path = (jax.tree_util.DictKey("mlp"), jax.tree_util.DictKey("gate"))
  with pytest.raises(ValueError, match="cannot shard 8 expert groups over 3 devices"):
    _spec(path, np.zeros((8, 2, 2)), ThreeDeviceMesh())
