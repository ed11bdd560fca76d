"emi_nb.metrics against scipy and torchmetrics; undefined correlations; bootstrap CI; submission file."
import warnings
import numpy as np, pandas as pd, pytest, torch
from scipy.stats import pearsonr
from torchmetrics import PearsonCorrCoef
from emi_nb.config import EMOTIONS
from emi_nb.metrics import pearson, mean_rho, ccc, bootstrap_ci, rho_report, write_submission

def _data(n=300, seed=0, noise=0.7):
    rng = np.random.default_rng(seed)
    y = rng.random((n, 6)) * (rng.random((n, 6)) > 0.6)          # labels piled at zero, like the task's
    return y + rng.normal(0, noise, (n, 6)), y

@pytest.mark.parametrize('seed', [0, 1, 2])
def test_pearson_matches_scipy_and_torchmetrics(seed):
    p, y = _data(seed=seed)
    ours = pearson(p, y)
    np.testing.assert_allclose(ours, [pearsonr(p[:, i], y[:, i])[0] for i in range(6)], atol=1e-12)
    tm = PearsonCorrCoef(num_outputs=6)(torch.tensor(p), torch.tensor(y)).numpy()
    np.testing.assert_allclose(ours, tm, atol=1e-6)
    assert mean_rho(p, y) == pytest.approx(np.mean(ours))

def test_pearson_torch_input_and_float32():
    p, y = _data()
    np.testing.assert_allclose(pearson(torch.tensor(p, dtype=torch.float32), torch.tensor(y)), pearson(p, y), atol=1e-6)

def test_constant_column_is_nan_and_named():
    p, y = _data()
    p[:, 4] = 0.25; y2 = y.copy(); y2[:, 0] = 0
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always'); r = pearson(p, y2)
    assert np.isnan(r[[0, 4]]).all() and np.isfinite(r[[1, 2, 3, 5]]).all()
    msg = str(w[0].message); assert 'Admiration' in msg and 'Excitement' in msg
    with pytest.warns(UserWarning, match='4 of 6'): m = mean_rho(p, y2)
    assert m == pytest.approx(np.nanmean(r))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); assert np.isnan(mean_rho(np.ones((10, 6)), y[:10]))

def test_ccc():
    p, y = _data()
    for i in range(6):
        a, b = p[:, i], y[:, i]
        ref = 2 * np.cov(a, b, bias=True)[0, 1] / (a.var() + b.var() + (a.mean() - b.mean())**2)
        assert ccc(p, y)[i] == pytest.approx(ref)

def test_bootstrap_ci_deterministic_and_covers():
    p, y = _data(n=500, noise=0.5)
    lo, hi = bootstrap_ci(p, y, 400, seed=3)
    assert (lo, hi) == bootstrap_ci(p, y, 400, seed=3)
    assert lo < mean_rho(p, y) < hi and 0 < hi - lo < 0.3
    rep = rho_report(p, y, 200)
    assert list(rep['per_emotion']) == EMOTIONS and rep['n'] == 500 and rep['n_undefined'] == 0

def test_write_submission(tmp_path):
    f = write_submission(np.array([10, 2]), np.array([[1.5] * 6, [-0.2] * 6]), tmp_path / 's.csv')
    df = pd.read_csv(f)
    assert list(df.columns) == ['Filename', *EMOTIONS] and df.Filename.tolist() == [2, 10]
    assert df.iloc[:, 1:].min().min() == 0 and df.iloc[:, 1:].max().max() == 1
    with pytest.raises(ValueError, match='NaN'): write_submission([1], [[np.nan] * 6], tmp_path / 'n.csv')
    with pytest.raises(ValueError, match='do not match'): write_submission([1, 2], [[0] * 6], tmp_path / 'm.csv')
