"""Stage one: the teacher ensemble, top-k codecs, the Zarr label store and the cache-teachers job."""
