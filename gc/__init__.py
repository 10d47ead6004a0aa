"""kdist.gc: lock-free repository maintenance (imported as ``kdist.gc``; the folder is ``gc/``)."""
