"""Packaging for selfee-plugin: SELFEE / SPA self-annotated preference alignment as an Axolotl plugin."""

from setuptools import find_packages, setup

setup(
    name="selfee-plugin",
    version="0.1.0",
    description="SELFEE / SPA (arXiv 2406.04412): self-annotated DPO rounds from a small seed, as an Axolotl plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["selfee_plugin", "selfee_plugin.*"]),
    python_requires=">=3.11",
    install_requires=[
        # 0.20+ needs Python 3.12; on 3.11 this resolves to 0.19.0, which the tests run on.
        "axolotl>=0.19.0,<0.22",
        # Axolotl 0.19 pins torch; 2.13.0 is a local CPU build on our machines, a wider range pulls CUDA wheels.
        "torch>=2.13.0,<2.14",
        "transformers>=5.16,<6",
        "trl>=1.9,<2",
        "peft>=0.20,<1",
        "bitsandbytes>=0.50,<1",
        "datasets",
        "tokenizers",
    ],
    extras_require={"dev": ["pytest>=8"]},
    entry_points={"console_scripts": ["selfee-demo=selfee_plugin.demo.run:main"]},
)
