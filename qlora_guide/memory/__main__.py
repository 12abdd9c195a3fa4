"""``python -m qlora_guide.memory --measure-gpu mistral-7b`` (or ``--measure-cpu smollm2-135m``)."""

from qlora_guide.memory.measure import main

raise SystemExit(main())
