"""Data selection: score documents and batches with a model, filter or resample a corpus offline
(`gptwo select score|filter|dsir`), and pick each training batch from a larger pool online
(`selection=loss|reducible`). The model file knows nothing of it; the trainer asks a selector."""
