"""Forecasters are exact on polynomial residuals of their order, at even and uneven step gaps."""
import pytest
import torch

from accel.caching.forecast import FoCaForecast, LastResidual, TaylorForecast, make_forecaster

BASE = torch.linspace(-1.0, 1.0, 12).reshape(3, 4)


def polynomial(coefficients):
    """Residual dict whose every element is sum_i c_i * s^i (times a fixed pattern)."""
    def at(step):
        value = sum(c * float(step) ** i for i, c in enumerate(coefficients))
        return {"hidden_states": BASE * value + value, "encoder_hidden_states": BASE[:1] * (2 * value)}
    return at


def history(signal, steps):
    return [(s, signal(s)) for s in steps]


def assert_exact(predicted, expected):
    for name in expected:
        torch.testing.assert_close(predicted[name], expected[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [(0, 2, 4), (1, 2, 5), (3, 7, 8)])
@pytest.mark.parametrize("target_offset", [1, 2, 5])
def test_taylor_order_1_exact_on_linear(steps, target_offset):
    signal = polynomial([0.3, -0.7])
    target = steps[-1] + target_offset
    assert_exact(TaylorForecast(1).predict(history(signal, steps), target), signal(target))


@pytest.mark.parametrize("steps", [(0, 2, 4), (1, 2, 5), (0, 3, 4, 9)])
@pytest.mark.parametrize("target_offset", [1, 3])
def test_taylor_order_2_exact_on_quadratic(steps, target_offset):
    signal = polynomial([0.5, -0.2, 0.05])
    target = steps[-1] + target_offset
    assert_exact(TaylorForecast(2).predict(history(signal, steps), target), signal(target))


def test_taylor_order_1_is_not_exact_on_quadratic():
    signal = polynomial([0.5, -0.2, 0.05])
    predicted = TaylorForecast(1).predict(history(signal, (0, 2, 4)), 6)
    assert not torch.allclose(predicted["hidden_states"], signal(6)["hidden_states"], atol=1e-3)


def test_taylor_with_short_history_falls_back_to_lower_order():
    signal = polynomial([0.5, 1.0])
    assert_exact(TaylorForecast(2).predict(history(signal, (2,)), 5), signal(2))
    assert_exact(TaylorForecast(2).predict(history(signal, (2, 3)), 5), signal(5))


@pytest.mark.parametrize("target_offset", [1, 2, 7])
def test_foca_exact_on_linear_at_any_lead(target_offset):
    signal = polynomial([0.3, -0.7])
    steps = (0, 2, 3)
    target = steps[-1] + target_offset
    assert_exact(FoCaForecast().predict(history(signal, steps), target), signal(target))


@pytest.mark.parametrize("steps,target", [((0, 1, 2), 3), ((0, 2, 4), 5), ((0, 2, 4), 6), ((1, 2, 5), 7)])
def test_foca_exact_on_quadratic_within_one_gap(steps, target):
    signal = polynomial([0.5, -0.2, 0.05])
    assert_exact(FoCaForecast().predict(history(signal, steps), target), signal(target))


def test_foca_damps_the_correction_beyond_one_gap():
    signal = polynomial([0.0, 0.0, 1.0])  # s^2
    hist = history(signal, (0, 1, 2))
    predicted = FoCaForecast().predict(hist, 6)["hidden_states"]  # lead 4 > gap 1
    linear = 4.0 + 4 * 3.0  # predictor: F(2) + 4 * slope over [1, 2]
    correction = 2.0 * 4 * (1 + 4) / 2  # a = 2 for s^2
    expected = linear + (1 / 4) * correction
    torch.testing.assert_close(predicted, BASE * expected + expected)


def test_forecasts_keep_dtype_and_plain_reuse_returns_the_last_residual():
    hist = [(0, {"hidden_states": torch.ones(2, 2, dtype=torch.bfloat16)}),
            (1, {"hidden_states": 2 * torch.ones(2, 2, dtype=torch.bfloat16)})]
    for forecaster in (TaylorForecast(1), FoCaForecast()):
        out = forecaster.predict(hist, 2)["hidden_states"]
        assert out.dtype == torch.bfloat16 and torch.equal(out, 3 * torch.ones(2, 2, dtype=torch.bfloat16))
    assert LastResidual().predict(hist, 5)["hidden_states"] is hist[-1][1]["hidden_states"]


def test_make_forecaster_validates():
    assert make_forecaster("taylor", 2).history_size == 3
    assert make_forecaster("foca").history_size == 3
    with pytest.raises(ValueError, match="order"):
        make_forecaster("taylor", 3)
    with pytest.raises(ValueError, match="forecast"):
        make_forecaster("spline")


@pytest.mark.parametrize("gap", [2, 3, 4, 5])
def test_taylor_order_2_is_not_worse_than_order_1_on_a_smooth_residual_sequence(gap):
    """A residual that settles smoothly at the scale of the gaps (two exponential decays of at most
    a tenth per step): at every lead inside the gap the quadratic forecast is at least as close as
    the linear one. Not on every sequence: with decays of a quarter per step, or a slow
    oscillation cos(0.15 s) added, the quadratic through points 4-5 steps apart overshoots
    (docs/cache_forecasting.md)."""
    import math

    def at(step):
        return {"hidden_states": BASE * math.exp(-0.05 * step) + 0.5 * math.exp(-0.1 * step)}

    for start in (0, 3, 7):
        hist = history(at, (start, start + gap, start + 2 * gap))
        for lead in range(1, gap):
            target = start + 2 * gap + lead
            errors = [float((TaylorForecast(order).predict(hist, target)["hidden_states"]
                             - at(target)["hidden_states"]).norm()) for order in (1, 2)]
            assert errors[1] <= errors[0]


@pytest.mark.parametrize("steps", [(0, 2, 4), (1, 2, 5), (3, 7, 8)])
@pytest.mark.parametrize("target_offset", [1, 3])
def test_taylorseer_is_exact_on_linear_and_its_order_1_is_taylors(steps, target_offset):
    signal = polynomial([0.3, -0.7])
    target = steps[-1] + target_offset
    for order in (1, 2):
        assert_exact(make_forecaster("taylorseer", order).predict(history(signal, steps), target), signal(target))
    quadratic = history(polynomial([0.5, -0.2, 0.05]), steps)
    assert_exact(make_forecaster("taylorseer", 1).predict(quadratic, target),
                 TaylorForecast(1).predict(quadratic, target))


@pytest.mark.parametrize("gap,lead", [(1, 1), (2, 1), (3, 2), (4, 4)])
def test_taylorseer_order_2_follows_curvature_by_the_backward_differences(gap, lead):
    """On s^2 from steps s0 - 2h, s0 - h, s0: D1 = 2 s0 - h, D2 = 2, so the forecast at s0 + k
    is s0^2 + (2 s0 - h) k + k^2 = (s0 + k)^2 - h k: short by h k where the exact quadratic is exact."""
    s0 = 9
    square = polynomial([0.0, 0.0, 1.0])
    predicted = make_forecaster("taylorseer", 2).predict(history(square, (s0 - 2 * gap, s0 - gap, s0)), s0 + lead)
    expected = float((s0 + lead) ** 2 - gap * lead)
    torch.testing.assert_close(predicted["hidden_states"], BASE * expected + expected)


def _fitted(weights_at_5, residuals=3, inputs=2):
    from accel.caching.forecast import FittedForecast, FittedWeights

    weights = FittedWeights(residuals, inputs, {"cond": {5: weights_at_5}})
    return FittedForecast(weights, make_forecaster("fitted", 2))


def test_fitted_forecast_is_its_weighted_sum_of_residuals_and_input_moves():
    from accel.caching.forecast import ForecastInputs

    signal = polynomial([0.5, -1.0, 0.25])
    hist = history(signal, (0, 2, 4))
    inputs_at = {s: {name: value * (s + 1) for name, value in signal(9).items()} for s in (0, 2, 4)}
    now = {name: value * 7 for name, value in signal(9).items()}
    weights = (1.5, -0.75, 0.125, -0.5, 0.25)
    out = _fitted(weights).predict(hist, 5, ForecastInputs("cond", now, inputs_at))
    for name in now:
        newest_first = [signal(s)[name] for s in (4, 2, 0)] + [now[name] - inputs_at[s][name] for s in (4, 2)]
        expected = sum(w * f for w, f in zip(weights, newest_first))
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-6)


def test_fitted_forecast_falls_back_to_taylorseer_without_weights_or_for_another_history():
    from accel.caching.forecast import ForecastInputs

    signal = polynomial([0.5, -1.0, 0.25])
    hist = history(signal, (0, 2, 4))
    inputs_at = {s: signal(s) for s in (0, 2, 4)}
    fitted = _fitted((1.0, 0.0, 0.0, 0.0, 0.0))  # weights only for the cond branch at step 5
    # another branch, a step without weights, or (no inputs known) fewer features than weights
    for branch, step, known in (("uncond", 5, inputs_at), ("cond", 6, inputs_at), ("cond", 5, {})):
        out = fitted.predict(hist, step, ForecastInputs(branch, signal(step), known))
        assert_exact(out, make_forecaster("taylorseer", 2).predict(hist, step))
    assert _fitted((1.0,)).history_size == 3 and _fitted((1.0,), residuals=4).history_size == 4
