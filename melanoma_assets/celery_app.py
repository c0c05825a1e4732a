"""The Celery app of a worker: ``dagster-celery worker start -A melanoma_assets.celery_app -q training``.

Built from the same ``MELANOMA_CELERY_*`` settings as the executor (``executors.celery_config_from_env``),
so a worker and the runs that send it steps cannot disagree on the broker or on acknowledgement. Import it
only in a worker: it connects to nothing until the worker starts, but it needs the broker set.
"""

from dagster_celery.executor import CeleryExecutor
from dagster_celery.make_app import make_app
from dagster_celery.tasks import create_execute_job_task, create_resume_job_task, create_task

from melanoma_assets.executors import celery_config_from_env

app = make_app(CeleryExecutor.for_cli(**celery_config_from_env()).app_args())
execute_plan = create_task(app)
execute_job = create_execute_job_task(app)
resume_job = create_resume_job_task(app)
