"""seqvis: sequence models for computer vision in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="seqvis",
    version="0.1.0",
    description="Attention, scanned RNNs, ViT, captioning and video models in JAX/Flax.",
    packages=find_packages(include=["seqvis", "seqvis.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8.2",  # jax.lax.pcast (first in 0.8.2; checked in the wheels) and jax.shard_map
        "flax>=0.10",
        "optax>=0.2.3",
        "orbax-checkpoint>=0.10",
        "tensorflow-cpu>=2.16",  # tf.data pipelines and TensorBoard event files
        "tensorflow-datasets>=4.9.6",
        "ml-collections>=0.1.1",
        "absl-py",
        "tensorboard",  # tf.summary event files (not bundled with tensorflow-cpu)
        "importlib_resources",  # needed by tfds dataset preparation (etils.epath)
        "numpy",
    ],
    extras_require={
        # safetensors: the reference reader/writer the own .safetensors code is checked against
        "test": ["pytest>=8", "pytest-xdist>=3.2", "pytest-timeout>=2.1", "safetensors>=0.4"],
        "plots": ["matplotlib>=3.7", "scipy>=1.10"],
    },
)
