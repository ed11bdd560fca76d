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

# --- the statistics against the outputs the former implementations gave ---------------------------------------------
# tests/metrics_before.json holds the outputs of the statistics as they were before they moved into emi_nb.metrics
# (pearson, mean_rho, bootstrap_ci, rho_report of metrics; seed_stats, paired_stats, boot_seed_means of ablations;
# split_stats of vision) on the inputs made below. The moved functions must give the same numbers to 1e-12.
# (Constant prediction columns are left out: the former bootstrap counted them as rho ~ 1e-16 instead of NaN.)

def _stack(n, k, s, seed, sparse=False, noise=0.5):
    rng = np.random.default_rng(seed)
    y = rng.random((n, k)) * ((rng.random((n, k)) > 0.6) if sparse else 1)
    return np.stack([y + rng.normal(0, noise * (1 + i / 3), (n, k)) for i in range(s)]), y

def _cases():
    c = {'n300k6s3seed0': _stack(300, 6, 3, 0), 'n50k6s1seed1sparse': _stack(50, 6, 1, 1, True),
         'n200k1s3seed3': _stack(200, 1, 3, 3), 'n40k6s3seed5sparse': _stack(40, 6, 3, 5, True)}
    P, y = _stack(100, 6, 3, 7); P[1, 5, 1] = np.nan; c['nan-pred'] = (P, y)
    P, y = _stack(60, 6, 2, 8); y[:, 0] = 0; y[3, 0] = 0.9; c['rare-label'] = (P, y)
    P, y = _stack(30, 6, 2, 9); P[0] = y; c['perfect'] = (P, y)
    return c

def _same(a, b, path=''):
    if isinstance(a, dict):
        assert set(a) <= set(b), path
        for k in a: _same(a[k], b[k], f'{path}/{k}')
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)): _same(u, v, f'{path}[{i}]')
    elif a is None or (isinstance(a, float) and np.isnan(a)): assert b is None or np.isnan(b), path
    else: assert abs(a - b) <= 1e-12, (path, a, b)

def _json(x):
    if isinstance(x, dict): return {k: _json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, np.ndarray)): return [_json(v) for v in x]
    return float(x) if isinstance(x, (float, np.floating)) else x

def test_statistics_equal_the_former_implementations():
    from pathlib import Path
    import json
    from emi_nb.metrics import seed_stats, paired_stats, split_stats, boot_seed_means
    before = json.loads(Path(__file__).with_name('metrics_before.json').read_text())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for name, (P, y) in _cases().items():
            nb = 200
            ys, ps = [y[i::len(P)] for i in range(len(P))], [p[i::len(P)] for i, p in enumerate(P)]
            now = dict(pearson=[pearson(p, y, warn=False) for p in P], mean_rho=[mean_rho(p, y, warn=False) for p in P],
                       bootstrap_ci0=bootstrap_ci(P[0], y, nb, seed=0), bootstrap_ci5_a10=bootstrap_ci(P[0], y, nb, seed=5, alpha=0.1),
                       seed_stats0=seed_stats(P, y, nb, 0), paired0=paired_stats(P, P[::-1], y, nb, 0),
                       paired_self5=paired_stats(P, P, y, nb, 5), split_stats0=split_stats(ps, ys, nb, 0),
                       split_stats5=split_stats(ps, ys, nb, 5), rho_report=rho_report(P[0], y, 100, 3),
                       boot_seed_means0_head=boot_seed_means(P, y, nb, 0)[:10])
            _same(before[name], _json(now), name)
