"""Model layer: what turns the data into a tracked, registered classifier.

builders (architectures) · phases (trainable parts, compiling) · losses · online_augment (Keras augmentation
layers used inside tf.data) · saving (the serving copy) · files (names of models/*) · training (both phases, one
MLflow run) · metrics (numbers) · reports (figures and report files) · calibration (temperature, ECE, NLL) ·
reliability (the reliability diagram) · features (penultimate features beside the probabilities) · familiarity
(is an image like the training data) · selective (the review threshold, risk–coverage, the one review rule) ·
riskcoverage (its plot) · testset (evaluation on the held-out split) · embedding (frozen-backbone features for the
leakage grouping) · provenance (what a model was trained on) · tracking (MLflow setup, run tags, killed and orphaned
runs) · registry (versions, aliases, gate) · card (the model card of a registered version).
"""
