"""Package discovery (the metadata lives in pyproject.toml): every package under qops/, and the Airflow layer in
operators/ installed as ``qops_airflow``. Nothing is listed by hand, so a new subpackage cannot be left out."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["qops", "qops.*"])
      + ["qops_airflow"] + [f"qops_airflow.{p}" for p in find_packages("operators")])
