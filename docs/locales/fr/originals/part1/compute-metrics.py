# Configuration métriques
def compute_metrics(eval_preds):
    logits, labels = eval_preds
    predictions = np.argmax(logits, axis=-1)

    # Calcul scores
    bleu_score = bleu.compute(
        predictions=predictions,
        references=labels
    )

    ppl = perplexity.compute(
        predictions=predictions,
        model_id="medical/model"
    )

    return {
        "bleu": bleu_score["bleu"],     # Score BLEU
        "perplexity": ppl["perplexity"] # Perplexité
    }
