# The Ray head for sharpen's training jobs: Ray plus what adapt.train_worker imports (torch,
# transformers, peft). sharpen ships its own `adapt` package with every job (runtime_env
# py_modules), so this image does not need sharpen itself, and never runs a stale worker.
FROM rayproject/ray:2.60.0-py311-gpu
RUN pip install --no-cache-dir "transformers>=4.46" "peft==0.21.2" "safetensors"
ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
