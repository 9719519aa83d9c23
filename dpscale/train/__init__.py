"""``dpscale train``: the main job. Private fine-tuning of a real pretrained model on real data,
configured by flags and a YAML file, on the same step driver as every other entry point.

    config.py      TrainConfig: every knob of the job, from YAML and flags
    tables.py      tables from CSV / TSV / JSON lines / a saved datasets folder, with each row's
                   line; the packaged E2E default
    data.py        tokenised datasets for classification and causal LM
    checks.py      every data file of a job checked before anything loads (file and line)
    rerun.py       a rerun in a folder with a checkpoint: resume, --fresh-key, or refuse, before
                   anything is written
    models.py      loading a hub id, a local folder or a GGUF file; trainable subsets; saving
    base_copy.py   a GGUF base saved as safetensors beside its LoRA adapter (loads with AutoPeftModel)
    model_card.py  the saved model's README.md: a model card carrying the privacy figures; the key note
    evaluate.py    eval loss and accuracy, generations and BLEU
    job.py         the run: accelerator, model, data, evaluation, and the private steps through the
                   step driver; launch/train.py and ``dpscale train`` call its ``run``
    baseline.py    the non-private baseline loop (--non-private)
    checkpoint.py  output_dir/checkpoint: save, check and resume parameters, optimizer and
                   privacy state (dpscale.checkpoint containers)
    report.py      progress and tracker values per step, metrics.json, training.png, the summary
"""
