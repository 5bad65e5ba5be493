# Metadata lives in pyproject.toml. The package list lives here because the Triton kernels
# sit in the top-level kernels/ folder but install as `engine.kernels`: no import name of this
# project shadows Hugging Face's published `kernels` package.
from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["engine", "engine.*"]) + ["engine.kernels"],
    package_dir={"engine.kernels": "kernels"},
)
