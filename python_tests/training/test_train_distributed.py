"""Two processes on CPU (gloo, launched with torchrun): identical LoRA on both ranks, and the all-reduced
Fisher equals the one-process Fisher.

(`accelerate launch --cpu --num_processes 2` starts one process unless MPI is configured; torchrun
sets RANK/WORLD_SIZE and accelerate picks gloo on a machine without GPUs.)"""
import json
import os
import subprocess
import sys

import torch

from dcfast.io.runs import load_tensors, task_dir
from dcfast.training.trainer import train

WORKER = '''
import json, sys, torch
torch.set_num_threads(1)
from accelerate import PartialState
from dcfast.training.adapters import lora_state
from dcfast.training.config import TrainConfig
from dcfast.io.runs import save_tensors
from dcfast.training.trainer import train

for name, values in json.loads(open(sys.argv[1]).read()).items():
    result = train(TrainConfig.from_dict(values))
    rank = PartialState().process_index
    save_tensors(f"{values['output_dir']}/lora_rank{rank}.safetensors", lora_state(result.method.models.unet))
'''


def test_two_processes_match(make_config, tmp_path):
    # 'trained': 2 steps per task, 2 tasks of EWC-DC (DC term, penalty, Fisher all-reduce, averaged gradients).
    # 'fisher': 0 steps, so the 1-process run reaches the same weights and the Fishers must agree.
    runs = {"trained": make_config("ewc-dc", output_dir=str(tmp_path / "trained"), train_batch_size=1),
            "fisher": make_config("ewc-dc", output_dir=str(tmp_path / "fisher2"), max_train_steps=0)}
    (tmp_path / "runs.json").write_text(json.dumps({k: v.to_dict() for k, v in runs.items()}, default=str))
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29517", str(tmp_path / "worker.py"), str(tmp_path / "runs.json")],
                              env=env, capture_output=True, text=True, timeout=400)
    assert launched.returncode == 0, launched.stderr[-3000:]

    trained = runs["trained"].output_dir
    rank0, rank1 = (load_tensors(f"{trained}/lora_rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    saved = load_tensors(task_dir(trained, 2) / "trainer_state.safetensors")
    assert all(torch.equal(rank0[k], saved[f"lora.{k}"]) for k in rank0)
    assert load_tensors(task_dir(trained, 2) / "fisher.safetensors")

    single = make_config("ewc-dc", output_dir=str(tmp_path / "fisher1"), max_train_steps=0)
    train(single)
    for i in (1, 2):
        two = load_tensors(task_dir(runs["fisher"].output_dir, i) / "fisher.safetensors")
        one = load_tensors(task_dir(single.output_dir, i) / "fisher.safetensors")
        assert two.keys() == one.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-3, atol=1e-4 * one[k].abs().max().item())  # batching noise
        assert sum(v.sum() for k, v in one.items() if k.startswith("fisher.")) > 0
