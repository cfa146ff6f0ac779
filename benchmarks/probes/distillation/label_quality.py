"""How good are the teacher's labels, by who answered and by the vote's confidence? banking77's train split
has the true labels the pipeline hides; this reads them back to score a labels.jsonl (a diagnostic only).

    .venv/bin/python benchmarks/probes/distillation/label_quality.py artifacts/local_full/teacher/labels.jsonl
"""
import csv, json, os, sys
from collections import Counter, defaultdict
from distill.data.dataset import normalize_label
truth = {}
for r in csv.DictReader(open(os.path.join(os.environ.get('BANKING77_DIR', '../shared/data/banking77'), 'train.csv'))):
    truth[r['text']] = normalize_label(r['category'])
recs = [json.loads(l) for l in open(sys.argv[1])]
recs = [r for r in recs if r.get('label')]
ok = lambda r: truth.get(r['text']) == r['label']
print('n', len(recs), 'acc', sum(map(ok, recs))/len(recs))
for src in ('vote','llm'):
    s=[r for r in recs if r['source']==src]; print(src, len(s), round(sum(map(ok,s))/max(1,len(s)),3))
for floor in (0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
    s=[r for r in recs if r['confidence']>=floor]
    print(f'floor {floor}: kept {len(s)} ({len(s)/len(recs):.0%}) precision {sum(map(ok,s))/max(1,len(s)):.3f}')
# per-bucket accuracy
b=defaultdict(list)
for r in recs: b[min(9,int(r['confidence']*10))].append(ok(r))
print({k/10: (len(v), round(sum(v)/len(v),2)) for k,v in sorted(b.items())})
c=Counter(r['label'] for r in recs); print('label counts min/max', min(c.values()), max(c.values()))
