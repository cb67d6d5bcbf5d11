"""Eve: dense anatomical embeddings of a pretrained encoder, and the pictures that judge them.

Adam's Eve is the embedding of an arbitrary crop (resized to the network input, passed through
the encoder, globally average-pooled); "dense" means one can be had at any location and scale.
This package extracts them from a MONAI ``ResNet`` (2D or 3D) or ``SwinUNETR`` and draws the three
pictures of the Adam papers: a t-SNE of patches around landmarks at three scales, dense
correspondence lines between two images, and the whole-vs-parts cosine similarity table; in 3D
on orthogonal slices. ``asa3d eve`` (``commands``, ``run``) does all of it for a checkpoint.

- ``asa3d.eve.embed``: ``EveEncoder``: crop embeddings (pooled deepest trained stage), feature maps
- ``asa3d.eve.load``: a checkpoint or export -> the ``EveEncoder`` that reads it as trained
- ``asa3d.eve.inputs``: the two images with landmarks (labels or a grid), rotated-crop copies
- ``asa3d.eve.landmarks``: landmarks from (projected) organ masks and label maps
- ``asa3d.eve.tsne``: landmark patch embeddings at several scales, t-SNE, cluster scores, plot
- ``asa3d.eve.localise``: landmark localisation by embedding search; cross-scale consistency
- ``asa3d.eve.correspondence``: top matches by cosine similarity, drawn as lines (2D and 3D)
- ``asa3d.eve.whole_parts``: cos(E(whole), mean E(parts)) against a shuffled baseline, table
- ``asa3d.eve.run``, ``asa3d.eve.commands``: the ``asa3d eve`` verb
"""
