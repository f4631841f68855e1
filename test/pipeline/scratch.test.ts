import { comparisonPlotSpec, renderVegaLite } from '../../lib/pipeline/report';
import { summarizeRuns } from '../../lib/pipeline/metrics';
test('x', async () => {
  const runs = [{template:'a',seed:1,accuracy:0.6,count:10},{template:'b',seed:1,accuracy:0.7,count:10}];
  const r = [{method:'T-Few',task:'rte',runs,summary:summarizeRuns(runs)},{method:'ICL',task:'rte',runs,summary:summarizeRuns(runs)}];
  const t0 = Date.now();
  const {svg,png} = await renderVegaLite(comparisonPlotSpec(r, [{method:'T-Few',inferenceFlopsPerExample:1e9,trainingFlops:1e12,diskBytes:100,accuracy:.6,accuracyIqr:.1,msPerExample:2,trainingSeconds:3,peakRssBytes:1e8,meanInputTokens:30},{method:'ICL',inferenceFlopsPerExample:1e10,trainingFlops:0,diskBytes:100,accuracy:.6,accuracyIqr:.1,msPerExample:20,trainingSeconds:0,peakRssBytes:1e8,meanInputTokens:300}]));
  require('fs').writeFileSync('/tmp/pl/plot.png', png); console.log(svg.length, png.length, Date.now()-t0);
});
