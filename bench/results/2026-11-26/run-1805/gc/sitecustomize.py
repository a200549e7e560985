import sys, os
if any("twistd" in a for a in sys.argv[:1]) or "securelan-keyserver" in " ".join(sys.argv):
    import gc, time, atexit, threading
    if os.environ.get('KS_GC_THRESHOLD'):
        gc.set_threshold(*map(int, os.environ['KS_GC_THRESHOLD'].split(',')))
    stats = {"t": 0.0, "n": [0, 0, 0], "tg": [0.0, 0.0, 0.0], "max": 0.0}
    start = [0.0]
    def cb(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            d = time.perf_counter() - start[0]
            g = info["generation"]
            stats["t"] += d; stats["n"][g] += 1; stats["tg"][g] += d; stats["max"] = max(stats["max"], d)
    gc.callbacks.append(cb)
    def dump():
        while True:
            time.sleep(5)
            with open("/tmp/ks-gc.txt", "a") as f:
                f.write(f"{time.time():.0f} {stats}\n")
    threading.Thread(target=dump, daemon=True).start()
