"""magmax against its formula in float64 NumPy: per entry the task vector of largest magnitude (ties: the later
model), scaled and added to the base; every floating tensor."""

import numpy as np
import pytest
import torch
from method_cases import decoder_state, f64, fine_tuned, merge


def magmax_reference(base: torch.Tensor, models: list[torch.Tensor], scaling: float) -> np.ndarray:
    tau = np.stack([f64(m) - f64(base) for m in models])
    last_largest = len(models) - 1 - np.argmax(np.abs(tau)[::-1], axis=0)  # argmax takes the first: search reversed
    return f64(base) + scaling * np.take_along_axis(tau, last_largest[None], axis=0)[0]


@pytest.mark.parametrize("scaling", [0.5, 1.0])
def test_magmax_is_its_formula_on_every_tensor(scaling):
    base = {k: v.double() for k, v in decoder_state(seed=0).items()}
    models = [{k: v.double() for k, v in fine_tuned(base, seed=s).items()} for s in (1, 2, 3)]
    merged = merge("magmax", models, base=base, **({} if scaling == 0.5 else {"scaling": scaling}))
    for name in base:
        assert merged[name].dtype == torch.float64
        np.testing.assert_allclose(f64(merged[name]), magmax_reference(base[name], [m[name] for m in models], scaling),
                                   rtol=0, atol=1e-15, err_msg=name)


def test_magmax_keeps_the_largest_change_and_gives_ties_to_the_later_model():
    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, -3.0, 2.0, 0.0])}, {"w": torch.tensor([-2.0, 1.0, -2.0, 0.0])}]
    assert merge("magmax", models, base=base, scaling=1.0)["w"].tolist() == [-2.0, -3.0, -2.0, 0.0]
