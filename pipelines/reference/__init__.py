"""The project's own small trained text-to-video model (WanPipeline format), its
procedural data, and the judge that scores it.  See build.py, train.py, judge.py."""
