"""The MLflow server image's entrypoint: `mlflow server` with MLflow's basic-auth app, its secrets
read from files (Docker / Kubernetes secrets), never from its command line.

    python serve.py --host 0.0.0.0 --port 5000 [mlflow server flags ...]

Environment:
    MLFLOW_DB_URI                    backend store URI without a password (postgresql://mlflow@db:5432/mlflow);
                                     also the auth app's user store (its own tables, in the same database)
    MLFLOW_DB_PASSWORD_FILE          the database password (optional: a store without one, e.g. SQLite);
                                     handed to libpq as PGPASSWORD, so no URI or file written here holds it
    MLFLOW_AUTH_ADMIN_PASSWORD_FILE  the admin's password, which the auth app needs to create the admin
                                     user on its first start (ignored once the user exists)
    MLFLOW_AUTH_ADMIN_USERNAME       the admin's name (default admin)
    MLFLOW_AUTH_SECRET_KEY_FILE      the key the auth app signs its CSRF tokens with (the same on every replica)
    MLFLOW_AUTH_DEFAULT_PERMISSION   what an authenticated user may do where nobody granted more (default READ)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

AUTH_INI = """[mlflow]
default_permission = {permission}
database_uri = {database_uri}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


def secret(variable: str) -> str:
    """The content of the file the environment variable `variable` names, without the final newline."""
    path = os.environ[variable]
    value = Path(path).read_text().rstrip("\n")
    if not value:
        raise SystemExit(f"serve.py: {variable}={path} is empty")
    return value


def server_environment() -> dict[str, str]:
    """The variables `mlflow server` reads its store, its auth config and its admin password from."""
    database_uri = os.environ["MLFLOW_DB_URI"]
    env = {
        "MLFLOW_BACKEND_STORE_URI": database_uri,
        "MLFLOW_AUTH_ADMIN_PASSWORD": secret("MLFLOW_AUTH_ADMIN_PASSWORD_FILE"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secret("MLFLOW_AUTH_SECRET_KEY_FILE"),
    }
    if "MLFLOW_DB_PASSWORD_FILE" in os.environ:
        env["PGPASSWORD"] = secret("MLFLOW_DB_PASSWORD_FILE")
    ini = AUTH_INI.format(
        permission=os.environ.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ"),
        database_uri=database_uri,
        admin=os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin"),
    )
    fd, path = tempfile.mkstemp(prefix="basic_auth.", suffix=".ini")
    with os.fdopen(fd, "w") as f:
        f.write(ini)
    return env | {"MLFLOW_AUTH_CONFIG_PATH": path}


def main() -> None:
    os.environ.update(server_environment())
    os.execv(sys.executable, [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", *sys.argv[1:]])


if __name__ == "__main__":
    main()
