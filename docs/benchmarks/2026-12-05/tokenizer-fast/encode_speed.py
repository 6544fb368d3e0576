import time, statistics, os, sys
sys.path.insert(0,'/work/main')
import tokenizers
from tandem.bench.corpus import make_texts
p=os.path.expanduser('~/.cache/tandem/repository/all-MiniLM-L6-v2/1/tokenizer.json')
tk=tokenizers.Tokenizer.from_file(p); tk.no_padding(); tk.enable_truncation(256)
texts=make_texts("short", 4096)
print(tokenizers.__version__)
def bench(fn, n=32):
    ts=[]
    for r in range(300):
        b=texts[(r*n)%4000:(r*n)%4000+n]
        t=time.perf_counter(); fn(b); ts.append(time.perf_counter()-t)
    return statistics.median(ts)*1e6
for k in range(2):
    print('encode_batch 32', bench(lambda b: tk.encode_batch(b)))
    if hasattr(tk,'encode_batch_fast'): print('encode_batch_fast 32', bench(lambda b: tk.encode_batch_fast(b)))
    print('encode_batch 1', bench(lambda b: tk.encode_batch(b),1))
    print('encode 1', bench(lambda b: tk.encode(b[0]),1))
    if hasattr(tk,'encode_batch_fast'): print('encode_batch_fast 1', bench(lambda b: tk.encode_batch_fast(b),1))
