"""Launch environments: torchrun, srun without torchrun (one GPU per task), a lone process, and the refusals."""
import pytest

from megatron_puffin.distributed.launch import cuda_device_index, first_host, launch_environment

SRUN_TASK = {"SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_PROCID": "13", "SLURM_LOCALID": "5",
             "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NODELIST": "gpu[007-008]",
             "SLURM_JOB_NODELIST": "gpu[007-008]"}


def test_srun_without_torchrun_gives_each_task_its_rank_and_a_shared_rendezvous():
    env = launch_environment(SRUN_TASK)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 13, 16, 5)
    assert env.master_addr == "gpu007" and env.master_port == 20000 + 123456 % 20000
    assert env.torchrun_variables() == {"RANK": "13", "WORLD_SIZE": "16", "LOCAL_RANK": "5",
                                        "MASTER_ADDR": "gpu007", "MASTER_PORT": str(20000 + 123456 % 20000)}
    given = launch_environment({**SRUN_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "29400"})
    assert (given.master_addr, given.master_port) == ("head", 29400)


def test_torchrun_wins_inside_a_slurm_step_and_a_lone_process_is_rank_0_of_1():
    env = launch_environment({**SRUN_TASK, "RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3",
                              "MASTER_ADDR": "n1", "MASTER_PORT": "29500"})
    assert (env.launcher, env.rank, env.world_size, env.local_rank, env.master_port) == ("torchrun", 3, 8, 3, 29500)
    single = launch_environment({})
    assert (single.launcher, single.rank, single.world_size) == ("single", 0, 1)
    one_task_job = launch_environment({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
    assert one_task_job.launcher == "single"


def test_a_multi_task_batch_script_without_srun_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="srun python pretrain_puffin.py"):
        launch_environment({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"})
    with pytest.raises(ValueError, match="SLURM_PROCID='x' is not an integer"):
        launch_environment({**SRUN_TASK, "SLURM_PROCID": "x"})


def test_slurm_host_lists():
    assert first_host("gpu[007-008]") == "gpu007"
    assert first_host("node[3,5-9],other1") == "node3"
    assert first_host("head01,node02") == "head01"
    assert first_host("rack1-[12-14]-ib") == "rack1-12-ib"


def test_one_visible_gpu_is_device_0_whatever_the_local_rank():
    assert cuda_device_index(5, 1) == 0
    assert cuda_device_index(5, 8) == 5
    with pytest.raises(ValueError, match="local rank 5 but only 4 GPU"):
        cuda_device_index(5, 4)
