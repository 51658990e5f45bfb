"""Models: the scorer seam, market detectors and their evaluation; appraisal and authentication next.

Builds on infra only (never imports streams or alerts). ``models.scorer``
defines the protocol every model and detector implements (kinds, key,
state, pure ``score``, ``learn``, versioned ``dump``/``load``) and the
derived rows (``SeriesPoint``) and alert candidates (``Signal``) it returns.
``models.detectors`` holds the per-collection market detectors (price index,
trend break, floor drop, volume spike; River drift detectors among them) and
``models.detectors.evaluate`` their evaluation on the real CryptoPunks
series. Not done yet: the stream stage that runs scorers (issue 9, points
2-4) and the appraisal and authentication networks.
"""
