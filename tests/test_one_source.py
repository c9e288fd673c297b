"""One source of truth: the method table, the key table as the only defaults, the parameter
object travelling whole (a background takes part in every score)."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import numpy as np
import pytest

from tests.distributed_data import FEATURES, make_rows, rows_as_written, schema, write_catalog
from tests.mixtures import known_mixture_3d
from xd_dask.config import KEYS, fit_keys, key
from xd_dask.distributed import FitConfig, fit_catalog, score_catalog
from xd_dask.distributed.kmeans import kmeans_init
from xd_dask.distributed.manifest import build_manifest
from xd_dask.distributed.passes import PassRunner
from xd_dask.distributed.tasks import TaskOptions
from xd_dask.estimator import XDGMM
from xd_dask.jobs.config import ConfigError, load_config
from xd_dask.model import XDModel
from xd_dask.optim import Method, Update, method_names, register
from xd_dask.optim.batch import batch_update
from xd_dask.optim.kmeans import array_passes, kmeans_start
from xd_dask.optim.methods import InapplicableSettingWarning, unregister
from xd_dask.params import Background, Params

PACKAGE = Path(__file__).resolve().parents[1] / "xd_dask"
K = 3


# ----------------------------------------------------------------------------- a new rule
class OverRelaxedEM:
    """Over-relaxed EM (Salakhutdinov & Roweis 2003): step past the EM update by ``eta`` and keep
    it when the same rows' log-likelihood there (one more pass: ``data.at``) beats the plain EM
    update's; a rule that needs a second look at the rows, added without editing the loop."""

    name = "over-relaxed-em"
    monotone = True

    def __init__(self, eta: float) -> None:
        self.eta = eta
        self.full_rows: list[int] = []

    def init(self, params):
        return {}

    def step_size(self, t):
        return self.eta

    def step(self, state, data, params, t):
        em = batch_update(data.stats, params)
        self.full_rows.append(data.full(params).n_rows)
        w = np.clip(params.weights + self.eta * (em.params.weights - params.weights), 1e-3, None)
        over = em.params.replace(
            weights=w / w.sum(),
            means=params.means + self.eta * (em.params.means - params.means),
        )
        if np.isfinite(data.at(over).ll) and data.at(over).ll > data.at(em.params).ll:
            return state, Update(over, em.reseeded, self.eta)
        return state, em


@pytest.fixture
def over_relaxed():
    rules = []

    def build(settings, planned):
        rules.append(OverRelaxedEM(1.5))
        return rules[-1]

    register(Method("over-relaxed", "over-relaxed EM", True, ("fit.max_iter",), build))
    yield rules
    unregister("over-relaxed")
    assert "over-relaxed" not in method_names()


@pytest.fixture(scope="module")
def rows():
    return make_rows(seed=5, n=2400)


@pytest.fixture(scope="module")
def one_file(tmp_path_factory, rows):
    """The rows as one Parquet file, ids 0..n-1 (the in-memory strata use row positions)."""
    X, S = rows
    root = tmp_path_factory.mktemp("one")
    write_catalog(root, X, S, 1, first_id=0)
    return str(root)


@pytest.mark.cluster
def test_a_rule_added_through_the_method_table_runs_in_memory_and_on_the_cluster(
    over_relaxed, client, rows, one_file
):
    assert "over-relaxed" in method_names() and "over-relaxed" in key("fit.method").choices
    Xw, Sw = rows_as_written(*rows)
    mem = XDGMM(K, method="over-relaxed", max_iter=6, tol=0.0, random_state=2).fit(Xw, Sw)
    cfg = FitConfig(
        catalog=one_file, schema=schema(), n_components=K, method="over-relaxed",
        max_iter=6, tol=0.0, seed=2,
    )  # fmt: skip
    model = fit_catalog(cfg, client)
    # the same start (k-means), the same rule, the same rows: the same fit
    np.testing.assert_allclose(model.weights, mem.weights_, rtol=1e-9)
    np.testing.assert_allclose(model.means, mem.means_, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(model.covariances, mem.covariances_, rtol=1e-8)
    assert model.metadata["method"] == "over-relaxed"
    # the rule saw every row through data.full, in memory and on the cluster
    assert all(n == len(Xw) for rule in over_relaxed for n in rule.full_rows)
    assert len(over_relaxed[0].full_rows) == len(over_relaxed[-1].full_rows) == 6
    # and it is a real improvement over EM here: it climbs faster from the same start
    em = XDGMM(K, max_iter=6, tol=0.0, random_state=2).fit(Xw, Sw)
    assert mem.score(Xw, Sw) > em.score(Xw, Sw)


# ----------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("name", ["online", "adam"])
def test_xdgmm_runs_every_method_of_the_table_in_memory(name, rows):
    """With the defaults a fit on waves stops when its epoch mean log-likelihood settles, and
    its lower_bound_ is the final parameters' mean log-likelihood over every row."""
    Xw, Sw = rows_as_written(*rows)
    batch = XDGMM(K, tol=1e-7, max_iter=500, random_state=1).fit(Xw, Sw)
    fit = XDGMM(K, method=name, random_state=1).fit(Xw, Sw)  # filterwarnings = error
    assert fit.model_.metadata["method"] == name and fit.converged_
    waves = [h for h in fit.history_ if "wave_mean_loglike" in h]
    assert len(waves) == fit.n_iter_ and fit.n_iter_ % 8 == 0  # 8 waves of 100 rows x K
    assert fit.history_[-1]["final"] and fit.lower_bound_ == pytest.approx(fit.score(Xw, Sw))
    gap = batch.score(Xw, Sw) - fit.score(Xw, Sw)
    assert -1e-4 < gap < 2e-3, gap  # close to the batch optimum, not above it


@pytest.mark.cluster
def test_xdgmm_starts_from_the_k_means_of_a_catalogue(client, rows, one_file):
    """XDGMM's k-means = the cluster's k-means on a one-partition catalogue of the same rows."""
    Xw, Sw = rows_as_written(*rows)
    runner = PassRunner(client, build_manifest(one_file), TaskOptions(schema()))
    cluster, _ = kmeans_init(runner, K, seed=7)
    memory, info = kmeans_start(*array_passes(Xw, 7), len(Xw), K, 7)
    np.testing.assert_allclose(memory.means, cluster.params.means, rtol=1e-12)
    np.testing.assert_allclose(memory.covariances, cluster.params.covariances, rtol=1e-12)
    start = XDGMM(K, random_state=7)._initial(Xw)
    np.testing.assert_array_equal(start.means, memory.means)
    assert info["passes"] == cluster.info["passes"] == key("fit.kmeans_iter").default


# ----------------------------------------------------------------------------- settings
def test_settings_that_do_not_apply_are_named(tmp_path, rows):
    with pytest.raises(ValueError, match="does not use fit.learning_rate"):
        FitConfig(catalog="c", method="em", learning_rate=0.2)
    with pytest.raises(ValueError, match=r"'adam' \(Adam\) does not use fit.step.kind"):
        FitConfig(catalog="c", method="adam", step={"kind": "halving"})
    FitConfig(catalog="c", method="adam", learning_rate=0.2)  # applies: fine
    # command line: an error naming the key and the flag
    with pytest.raises(ConfigError, match=r"does not use fit.epochs \(set in --epochs\)"):
        load_config(None, {"fit.epochs": 3}, {}, override_sources={"fit.epochs": "--epochs"})
    # a job file: a warning naming the key and the file (a job may be run with another --method)
    job = tmp_path / "job.toml"
    job.write_text("[fit]\nmethod = 'adam'\nlearning_rate = 0.1\n[fit.step]\nkind = 'halving'\n")
    with pytest.warns(InapplicableSettingWarning, match=f"fit.step.kind \\(set in job file {job}"):
        load_config(job, {}, {})
    with pytest.warns(InapplicableSettingWarning, match="fit.learning_rate"):
        load_config(job, {"fit.method": "online"}, {})
    Xw, Sw = rows_as_written(*rows)
    with pytest.warns(InapplicableSettingWarning, match="does not use epochs, learning_rate"):
        XDGMM(K, learning_rate=0.2, epochs=3, max_iter=2, tol=0.0).fit(Xw, Sw)
    with pytest.raises(ValueError, match="unknown fit method 'sgd'"):
        XDGMM(K, method="sgd").fit(Xw, Sw)


def test_the_halving_floor_is_a_cross_key_rule():
    """floor <= lambda0 is checked with the job's other values, where they are set."""
    with pytest.raises(ConfigError, match=r"fit.step.floor \(0.05\) must be <= fit.step.lambda0"):
        load_config(
            None,
            {"fit.method": "online", "fit.step.kind": "halving", "fit.step.lambda0": 0.01,
             "fit.step.floor": 0.05},
            {},
        )  # fmt: skip
    with pytest.raises(ValueError, match="must be <= fit.step.lambda0"):
        FitConfig(catalog="c", method="online", step={"kind": "halving", "lambda0": 0.01,
                                                      "floor": 0.05})  # fmt: skip


def test_fit_config_fields_are_the_key_table():
    fields = {f.name: f for f in dataclasses.fields(FitConfig)}
    keyed = {k.field: k for k in fit_keys()}
    assert set(fields) == set(keyed) | {"step", "checkpoint_dir", "performance_report"}
    for name, k in keyed.items():
        if name == "catalog":
            continue
        want = None if k.has_unset and k.default == k.unset else k.default
        assert fields[name].default == want, name
    step = FitConfig(catalog="c").step
    for f in dataclasses.fields(step):
        assert getattr(step, f.name) == key(f"fit.step.{f.name}").default
    assert set(method_names()) >= {"em", "online", "adam"}
    assert tuple(key("fit.method").choices) == method_names()
    assert "reference" in key("fit.backend").choices and "auto" in key("fit.backend").choices


#: Parameter / field names that take a key's default under another name.
ALIASES = {
    "candidates": "fit.split_merge_candidates",
    "partial_iter": "fit.split_merge_partial_iter",
    "max_moves": "fit.split_merge_max_moves",
    "trial_waves": "fit.split_merge_trial_waves",
    "max_steps": "fit.max_iter",
    "random_state": "fit.seed",
    "sample_size": "fit.kmeans_sample",
}


def _literal_defaults(tree: ast.AST):
    """(name, literal value, line) of every literal default: function parameters, class-body
    fields, keyword arguments of calls."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            pos = args.posonlyargs + args.args
            for a, d in zip(pos[len(pos) - len(args.defaults) :], args.defaults, strict=True):
                yield a.arg, d, d.lineno
            for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True):
                if d is not None:
                    yield a.arg, d, d.lineno
        elif isinstance(node, ast.ClassDef):
            for st in node.body:
                if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name) and st.value:
                    yield st.target.id, st.value, st.lineno
        elif isinstance(node, ast.Call):
            for kw in node.keywords:
                if kw.arg is not None:
                    yield kw.arg, kw.value, kw.value.lineno


def test_no_default_of_the_key_table_is_restated():
    """A parameter, field or keyword named like a key (or its alias) never carries that key's
    default as a literal: the default lives in the table (xd_dask/config.py) only."""
    by_leaf: dict[str, list] = {}
    for k in KEYS:
        if k.section.startswith(("fit", "catalog")) and k.type in (int, float, str):
            by_leaf.setdefault(k.leaf, []).append(k)
    for alias, name in ALIASES.items():
        by_leaf.setdefault(alias, []).append(key(name))
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path == PACKAGE / "config.py" or path.is_relative_to(PACKAGE / "kernels"):
            continue  # the table itself; the kernels know nothing of configuration
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name, node, line in _literal_defaults(tree):
            if name not in by_leaf or not isinstance(node, ast.Constant):
                continue
            value = node.value
            if isinstance(value, bool) or value in (None, 0, 1, "", 0.0):
                continue  # "not set", "none" and unit values are not restated defaults
            for k in by_leaf[name]:
                if type(value) is k.type and value == k.default:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name}={value!r}")
    assert not found, "defaults restated below the key table:\n" + "\n".join(found)


# ----------------------------------------------------------------------------- one mixture
@pytest.mark.cluster
def test_score_with_a_background_equals_log_density(client, rows, one_file, tmp_path):
    """A model whose background holds 30 % of the weight scores the same through the cluster
    (score_catalog: the held-out score of report.json, the nightly gate, select) and through
    XDModel.log_density on the same rows."""
    w, m, V = known_mixture_3d()
    bg = Background(0.3, [-40.0, -40.0, -40.0], [40.0, 40.0, 40.0])
    model = XDModel(Params(0.7 * w, m, V, bg), FEATURES)
    Xw, Sw = rows_as_written(*rows)
    want = float(np.mean(model.log_density(Xw, Sw)))
    without = float(np.mean(XDModel(Params(w, m, V), FEATURES).log_density(Xw, Sw)))
    assert abs(want - without) > 0.05  # the background matters on these rows
    res = score_catalog(model, one_file, schema(), client, out_dir=tmp_path / "rows")
    assert res.mean_loglike == pytest.approx(want, rel=1e-9)
    assert res.n_rows == len(Xw)
