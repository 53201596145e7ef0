"""Packaging for clowder-hpc-agent: the agent (runs inside HPC allocations) and the launcher."""
from setuptools import find_packages, setup

setup(
    name="clowder-hpc-agent",
    version="0.1.0",
    description="Run unchanged pyclowder extractors on HPC allocations (PBS, Torque, Slurm)",
    python_requires=">=3.9",
    packages=find_packages(include=["agent", "agent.*", "launcher", "launcher.*", "hpc_common", "hpc_common.*"]),
    include_package_data=True,
    install_requires=[
        "requests>=2.28",
        "pika>=1.3,<2",
        "filelock>=3.8",
        "psutil>=5.9",
        "pyyaml>=6",
        "pyclowder==3.0.8",
        "prometheus-client>=0.17",
        "matplotlib>=3.6",
        "aiohttp>=3.9",   # the relay's HTTP server and its Clowder client (launcher/relay)
        "uvloop>=0.17",   # the relay's event loop when present (about twice asyncio's speed)
    ],
    extras_require={
        # Only MPI runs (mpiexec -n N python -m agent run) need mpi4py. HPC sites may build
        # mpi4py against their own MPI instead; for development and CI the MPICH wheel is enough.
        "mpi": ["mpi4py>=3.1", "mpich"],
        # simpy: tests/unit/test_scale_model.py runs the scale model in CI.
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "import-linter>=2", "simpy>=4.1"],
        # The benchmarks' extra tools: the scale model (SimPy) and its plots.
        "bench": ["simpy>=4.1", "matplotlib>=3.7"],
    },
    entry_points={
        "console_scripts": [
            "clowder-agent=agent.__main__:main",
            "clowder-launcher=launcher.__main__:main",
        ]
    },
)
