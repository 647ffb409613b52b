"""A laughter segmenter plugged in by dotted path (tests): returns the segments set in SEGMENTS."""

SEGMENTS: list = []


class Detector:
    def segments(self, wavs):
        return SEGMENTS[: len(wavs)]
