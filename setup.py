"""Packaging for Willi: `pip install .` gives the `willi` command."""

import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "willi" / "__init__.py").read_text()).group(1)

setup(
    name="willi",
    version=VERSION,
    description="A recipient-routing SMTP proxy for the MX role",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["willi", "willi.*"]),
    install_requires=[
        "toml>=0.10",
        "mysql-connector-python>=8.0",
        "python-daemon>=2.3",
    ],
    extras_require={
        # Prometheus metrics; the release tarball ships the wheel and
        # install.sh installs willi[metrics], so installations always have it.
        "metrics": ["prometheus_client>=0.16"],
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "trustme>=1.0",
            "ruff",
            "prometheus_client>=0.16",  # the metrics tests
        ],
        # The manual mutation check (make mutation, tests/MUTATION.md).
        "mutation": ["mutmut>=3.3,<4"],
    },
    entry_points={"console_scripts": ["willi = willi.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Communications :: Email :: Mail Transport Agents",
        "Operating System :: POSIX :: Linux",
    ],
)
