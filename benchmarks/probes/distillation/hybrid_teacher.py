"""Prototype of the recommended teacher as a DSPy module: retrieval + a classical vote inside forward,
the LLM (served, grammar-restricted to the candidates) asked only where the vote is not confident.

forward(text):
  p = LR(gold MiniLM embeddings).predict_proba(embed(text))
  candidates = LR top-m labels
  if max(p) >= tau: answer = argmax p                       (no LLM call)
  else: demos = one nearest gold example per candidate label, most probable last (or k nearest, nearest last)
        answer = program(text, demos) with CandidateJSONAdapter(candidates)   (server grammar = the m labels)
"""
import dspy, numpy as np
from distill.lm import CandidateJSONAdapter
from distill.program import IntentClassificationModule
from distill.teacher.program import embed


class HybridTeacher(dspy.Module):
    def __init__(self, program: IntentClassificationModule, gold, embedder, lr, m=4, tau=1.01, demos="diverse", k=2):
        super().__init__()
        self.program, self.embedder, self.lr = program, embedder, lr
        self.gold = list(gold); self.m, self.tau, self.demo_mode, self.k = m, tau, demos, k
        self.G = embed(embedder, [g.text for g in self.gold]).astype(np.float32)
        self.cls = list(lr.classes_)

    def forward(self, text: str) -> dspy.Prediction:
        v = embed(self.embedder, [text])[0]
        p = self.lr.predict_proba(v[None])[0]
        top = [self.cls[j] for j in np.argsort(-p)[: self.m]]
        if p.max() >= self.tau:
            return dspy.Prediction(label=top[0], source="vote", confidence=float(p.max()))
        order = np.argsort(-(self.G @ v))
        if self.demo_mode == "diverse":
            demos = [self.gold[next(j for j in order if self.gold[j].label == lab)] for lab in reversed(top)]
        else:
            demos = [self.gold[j] for j in reversed(order[: self.k])]
        with dspy.context(adapter=CandidateJSONAdapter(top)):
            pred = self.program(text=text, demos=demos)
        return dspy.Prediction(label=pred.label, source="llm", confidence=float(p.max()))
