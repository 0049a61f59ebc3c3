"""HPO studies persist in an Optuna RDB storage under the home (a URL shares them); --resume continues one."""
import pytest

from orchestrator.runner import RunnerError, optuna_storage
from orchestrator.settings import Settings


def test_default_storage_is_sqlite_under_home_and_a_url_overrides_it(tmp_path):
    assert Settings(home=tmp_path).optuna_url == f"sqlite:///{tmp_path / 'optuna' / 'optuna.db'}"
    assert Settings(home=tmp_path, optuna_storage="postgresql://db/optuna").optuna_url == "postgresql://db/optuna"


def test_study_is_created_through_ray_searcher_and_resume_continues_it(tmp_path):
    from ray.tune.search.optuna import OptunaSearch
    from ray import tune

    s = Settings(home=tmp_path)
    storage = optuna_storage(s, "hpo-smoke", resume=False)
    searcher = OptunaSearch(seed=0, storage=storage, study_name="hpo-smoke")
    searcher.set_search_properties("val_dsc", "max", {"lr": tune.loguniform(1e-4, 1e-2)})
    params = searcher.suggest("t1")
    searcher.on_trial_complete("t1", {"val_dsc": 0.5, **params})
    assert (tmp_path / "optuna" / "optuna.db").is_file()

    import optuna

    study = optuna.load_study(study_name="hpo-smoke", storage=s.optuna_url)
    assert [t.value for t in study.trials] == [0.5]
    # a second fresh run under the same name would mix two studies: refused, naming the study
    with pytest.raises(RunnerError, match="'hpo-smoke' already exists.*--resume"):
        optuna_storage(s, "hpo-smoke", resume=False)
    assert optuna_storage(s, "hpo-smoke", resume=True) is not None


def test_unusable_storage_is_named(tmp_path):
    with pytest.raises(RunnerError, match="Optuna storage nosuchdb://x cannot be opened"):
        optuna_storage(Settings(home=tmp_path, optuna_storage="nosuchdb://x"), "s", resume=False)
