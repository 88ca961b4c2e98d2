export PYTHONPATH=$PWD/.gpubundle/h5site:$PWD PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind
python3 benchmarks/make_cohort96.py /tmp/neurox_cohort96 2>&1 | tail -1
timeout 100 python3 benchmarks/loader_rate.py --manifest /tmp/neurox_cohort96/manifest.parquet --workers 4 8 12 --pin on --batches 30 --out $OUT/loader_ring.json 2>&1 | grep -v filter | tail -4
export TRAIN_S=170 SPEED_STEPS=100 HDF5_WORKERS=8 COHORT=/tmp/neurox_cohort96
bash benchmarks/gpu_targets_session.sh hdf5-51 2>&1 | grep -o '"samples_per_s": [0-9.]*, "samples_per_s_all": \[[^]]*\]\|peak_mem_gib": [0-9.]*'
