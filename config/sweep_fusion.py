# Hyperparameter search for the MDF-Net fusion recipe (python sweep.py config/sweep_fusion.py): the 9 knobs of
# seed 002's search space over config/fusion_mimic.py, Bayesian (100 trials, 15 random first) by default; the
# seed's random search is `--method=random --n_trials=50 --out_dir=out/sweep_fusion_random`.
# Each trial is a shortened run (train_args): ~2 epochs (PROJECTION: 3,800 steps of 128 images on ~243k images),
# stage 1 of ~0.25 epoch. Hardware: 4 GPUs per trial. Time: not measured (no MIMIC access here).
# On the phantom (CPU) the same space runs with
#   python sweep.py config/sweep_fusion.py --train_config=config/fusion_phantom64.py --train_args='--max_iters=300 --freeze_iters=100' --n_trials=10
# Resume: rerun the same command; finished trials in out_dir/sweep.jsonl are skipped.
train_config = "config/fusion_mimic.py"
train_args = "--max_iters=3800 --lr_decay_iters=3800 --freeze_iters=500 --eval_interval=500 --early_stop_patience=3"
method = "bayes"
n_trials = 100
n_init = 15  # random trials before the GP (~1.5x the 9 dimensions)
seed = 0
mode = "max"  # the objective is train.py's best_metric = best validation auc_macro
out_dir = "out/sweep_fusion"
space = {
    "learning_rate": ("log", 1e-4, 3e-3),     # stage 1 (fusion + head, encoders frozen); the seed's default 1e-3
    "stage2_lr": ("log", 1e-5, 3e-4),         # stage 2 fusion + head; default 1e-4
    "lr_backbone_mult": ("log", 0.03, 0.3),   # stage 2 encoders = stage2_lr x this; default 0.1 (1e-5)
    "weight_decay": ("log", 1e-5, 1e-2),      # default 1e-4
    "fusion_dropout": ("uniform", 0.0, 0.5),  # default 0.3
    "head_dropout": ("uniform", 0.0, 0.5),    # default 0.3
    "fusion_dim": ("choice", [128, 256, 512]),
    "bce_weight": ("uniform", 0.3, 1.0),      # bce + focal mix; default 0.7
    "focal_gamma": ("uniform", 0.5, 3.0),     # default 2
}
