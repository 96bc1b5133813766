"""Every method behaves as on the commit that wrote ``tests/reference`` (see ``method_reference.py``): same
clusters, losses, bytes, scores and answers (``answers_crc32``), and the same shared adapters.

On the platform that wrote the reference (torch build and CPU kernels) floats agree to 1e-6 and every answer is
the same. Elsewhere float32 kernels sum in another order: floats are compared to 1e-3, and the answer checksums,
which one flipped token would change, are not compared.
"""

import json
import math

import numpy as np
import pytest
from method_reference import METHOD_NAMES, REFERENCE, load, platform, run

SAME_PLATFORM = json.loads((REFERENCE / "platform.json").read_text()) == platform()
TOLERANCE = 1e-6 if SAME_PLATFORM else 1e-3


def _assert_close(got, want, where: str = "metrics") -> None:
    """``got`` holds everything ``want`` holds (it may hold more: new figures), equal up to ``TOLERANCE``."""
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for key, value in want.items():
            assert key in got, f"{where}.{key} is missing"
            if key != "answers_crc32" or SAME_PLATFORM:
                _assert_close(got[key], value, f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, str):
        assert math.isclose(got, want, rel_tol=TOLERANCE, abs_tol=TOLERANCE**1.5), f"{where}: {got} != {want}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_behaves_as_its_reference(method, tmp_path):
    metrics, adapters = run(method, tmp_path)
    want_metrics, want_adapters = load(method)
    _assert_close(metrics, want_metrics)
    assert sorted(adapters) == sorted(want_adapters)
    for key, value in want_adapters.items():
        np.testing.assert_allclose(adapters[key], value, rtol=10 * TOLERANCE, atol=TOLERANCE, err_msg=key)
