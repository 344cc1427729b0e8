-- Run once by the postgres image, on its first start with an empty data volume
-- (mounted into /docker-entrypoint-initdb.d by docker-compose.yml), as POSTGRES_USER
-- (hpsearch), who then owns the new database.
--
-- MLflow gets a database of its own: Optuna (in `hpsearch`) and MLflow both keep their
-- schema version in a table named `alembic_version`, so they cannot share one.
CREATE DATABASE mlflow;
