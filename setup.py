"""Packaging for selfee-plugin: SELFEE / SPA self-annotated preference alignment as an Axolotl plugin."""

from setuptools import find_packages, setup

setup(
    name="selfee-plugin",
    version="0.1.0",
    description="SELFEE / SPA (arXiv 2406.04412): self-annotated DPO rounds from a small seed, as an Axolotl plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["selfee_plugin", "selfee_plugin.*"]) + ["selfee_plugin.patches"],
    # Version-guarded upstream fixes live in the top-level patches/ (the project's layout) and ship inside the package.
    package_dir={"selfee_plugin.patches": "patches"},
    python_requires=">=3.11",
    # Every package selfee_plugin imports. Versions are left to Axolotl's pins (0.19.0 pins all of them but tqdm,
    # and torch to a range); a range here states only what our own code needs. The CPU torch build
    # (torch==2.13.0) is the install environment's choice, made by demo.sh and .ci/run before this package is
    # installed, not a requirement of the plugin.
    install_requires=[
        # The plugin API; 0.20+ need Python 3.12, so on 3.11 this resolves to 0.19.0, which the tests run on.
        "axolotl>=0.19.0,<0.22",
        # trainer.py reads TRL DPOTrainer internals (listed in its docstring, checked by test_upstream_contract);
        # the range is what that contract was checked on: widen it only after the contract passes on a newer TRL.
        "trl>=1.9,<1.10",
        "accelerate",
        # Imported only for 4-bit models (QLoRA), which need it; Axolotl leaves it out on macOS too.
        'bitsandbytes; sys_platform != "darwin"',
        "datasets",
        "matplotlib",  # selfee/report.png
        "packaging",
        "peft",
        "pydantic>=2",
        "pyyaml",
        "torch",
        "tqdm",
        "transformers",
        "typing_extensions",
    ],
    # The demo (examples/selfee_demo) is not in the wheel; demo.sh runs it from the source tree.
    extras_require={"dev": ["pytest>=8"]},
)
