"""Where a graphed pass's time goes: replay alone (CUDA events) against the whole backend.forward."""
import time, torch, statistics
from picospec.cloud_server.engine import EngineOptions, StaticEngine
from picospec.shared.models import load_model
for name in ("random:qwen2.5-1.5b", "random:qwen2.5-7b"):
    m = load_model(name, device="cuda", dtype=torch.bfloat16, progress=False).model
    eng = StaticEngine(m, EngineOptions(slots=2, max_len=544))
    be = eng.backend(); be.prefill(list(range(100, 612)))
    g = eng.graphs[(1, 1, 512)] if (1,1,512) in eng.graphs else None
    key = min(k for k in eng.graphs if k[1] == 1)
    g = eng.graphs[key]
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5): g.graph.replay()
    torch.cuda.synchronize(); rs=[]
    for _ in range(30):
        s.record(); g.graph.replay(); e.record(); torch.cuda.synchronize(); rs.append(s.elapsed_time(e))
    ws=[]
    for _ in range(30):
        be.truncate(512); torch.cuda.synchronize(); t=time.perf_counter(); be.forward([5]); torch.cuda.synchronize(); ws.append(1e3*(time.perf_counter()-t))
    nbytes = sum(p.numel()*p.element_size() for p in m.parameters())
    print(f"{name}: graph {key} replay {statistics.median(rs):.2f} ms, backend.forward {statistics.median(ws):.2f} ms, weights {nbytes/1e9:.2f} GB -> {nbytes/3.0e12*1e3:.2f} ms at 3 TB/s; graph nodes {g.graph.__class__.__name__}")
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3): g.graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    del m, eng, be, g; torch.cuda.empty_cache()
