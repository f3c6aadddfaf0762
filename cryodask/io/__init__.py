"""Reading and writing RELION's files (STAR, MRC) and the Zarr particle store."""
