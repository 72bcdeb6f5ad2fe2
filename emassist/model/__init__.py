"""Model layer: what turns the data into a tracked, registered classifier.

builders (architectures) · phases (trainable parts, compiling) · losses · online_augment (Keras augmentation
layers used inside tf.data) · saving (the serving copy) · files (names of models/*) · training (both phases, one
MLflow run) · metrics (numbers) · reports (figures and report files) · calibration (temperature, ECE, NLL) ·
reliability (the reliability diagram) · testset (evaluation on the held-out split)
· tracking (MLflow setup, run tags, killed and orphaned runs) · registry (versions, aliases, gate).
"""
