"""Face detection (MTCNN) and 5-point similarity alignment to 112x112 RGB crops.

Modules: ``nets`` (P-Net, R-Net, O-Net and their weights), ``mtcnn`` (the detector),
``similarity`` (reference points and ``align_face``), ``align`` (public API: ``get_aligned_face``,
``detect_faces``, ``align_folder``), ``sample_images`` (``ensure_test_images``).
"""
