"""The tags that tie MLflow runs to a study and its trials (a run's place in the study)."""

STUDY_TAG = "hpsearch.study"  # the study's name, on its parent run (and, from the caller, on trial runs)
REFIT_TAG = "hpsearch.refit_of"  # on a refit's run: the number of the trial whose configuration it retrains
ROLE_TAG = "hpsearch.role"  # "study" or "trial": tells the parent run apart from trial runs with the same study tag
TRIAL_TAG = "hpsearch.trial"  # the Optuna trial number of a child run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own nesting tag: the UI shows trial runs under the study's run
