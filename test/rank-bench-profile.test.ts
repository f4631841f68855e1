// The benchmark's GEMM-by-shape breakdown (benchmarks/rank-bench.ts): the profile's per-shape GEMM times
// (TFEW_CUDA_PROFILE_DETAIL, gpu/profiler.h) turned into calls, milliseconds and TFLOP/s per shape, and the table's
// line of the slowest shapes. Computed here from made-up profile lines: no GPU needed.
import { bestCombination, defaultVerdicts, gemmShapeFlops, ProfileLine, RankBenchResult, summariseGemmShapes, table } from '../benchmarks/rank-bench';

describe('rank-bench GEMM shapes', () => {
  test('a shape key gives the FLOPs of one call: 2 M N K, times the batch', () => {
    expect(gemmShapeFlops('linear 8192x6144x2048')).toBe(2 * 8192 * 6144 * 2048);
    expect(gemmShapeFlops('strided 512x256x2048x32')).toBe(2 * 512 * 256 * 2048 * 32);
    expect(gemmShapeFlops('linear')).toBeNaN();
  });

  test('per shape: the median time and calls over the profiled calls, and the rate they give', () => {
    const lines: ProfileLine[] = [
      { forward_ms: 10, graph: false, gemm_shapes: { 'linear 1024x1024x1024': { ms: 1, calls: 4 }, 'batched 64x64x64x8': { ms: 0.5, calls: 2 } } },
      { forward_ms: 11, graph: false, gemm_shapes: { 'linear 1024x1024x1024': { ms: 3, calls: 4 } } },
      { forward_ms: 12, graph: false, gemm_shapes: { 'linear 1024x1024x1024': { ms: 2, calls: 4 }, 'batched 64x64x64x8': { ms: 0.7, calls: 2 } } },
    ];
    const s = summariseGemmShapes(lines);
    expect(s['linear 1024x1024x1024'].ms).toBe(2);
    expect(s['linear 1024x1024x1024'].calls).toBe(4);
    // 4 calls of 2^31 FLOPs in 2 ms: 4.29 TFLOP/s
    expect(s['linear 1024x1024x1024'].tflops).toBeCloseTo((4 * 2 * 1024 ** 3) / 2e9, 6);
    // a shape missing from a call counts as 0 there (median of 0.5, 0, 0.7)
    expect(s['batched 64x64x64x8'].ms).toBe(0.5);
  });

  test('the table lists each breakdown\'s slowest shapes, longest first', () => {
    const ours = {
      device: 'test', describe: 'made up', loadSeconds: 1, firstResultMs: 1, workloads: {},
      breakdown: {
        'RANK-3B-B1': {
          totalMs: 5, familiesMs: { gemm: 4, rmsnorm: 1 }, gemmShare: 0.8,
          gemmShapes: {
            'linear 16x2048x2048': { ms: 0.5, calls: 48, tflops: 0.3 },
            'linear 256x6144x2048': { ms: 1.5, calls: 24, tflops: 120 },
          },
        },
      },
    } as unknown as RankBenchResult;
    const text = table(ours, undefined);
    expect(text).toMatch(/RANK-3B-B1 GEMMs by shape \(the 10 longest\): linear 256x6144x2048 24 calls 1\.50 ms 120 TFLOP\/s; linear 16x2048x2048 48 calls 0\.50 ms/);
  });

  test('the table says which measured default its alternative beat, and where that default is set', () => {
    const w = (ms: number) => ({ medianForwardMs: ms, medianWallMs: ms + 1, forwardMs: [ms], examplesPerSecond: 1 });
    const ours = {
      device: 'test', describe: 'made up', loadSeconds: 1, firstResultMs: 1,
      workloads: { 'TRAIN-3B': w(43), 'TRAIN-3B-CUBLAS-BACKWARD': w(38.7), 'RANK-3B-B1': w(5), 'RANK-3B-B1-PRECOMPUTED': w(5.5) },
    } as unknown as RankBenchResult;
    const verdicts = defaultVerdicts(ours);
    expect(verdicts).toHaveLength(2);  // pairs with a row missing are left out
    expect(verdicts[0]).toMatch(/^CHANGE THE DEFAULT\? the cuBLAS attention backward: TRAIN-3B-CUBLAS-BACKWARD 38\.70 ms < TRAIN-3B 43\.00 ms \(-10\.0 %; cuda_engine\.cc fused_backward_wanted\)$/);
    expect(verdicts[1]).toMatch(/^default kept: .* RANK-3B-B1-PRECOMPUTED 5\.50 ms vs RANK-3B-B1 5\.00 ms \(\+10\.0 %\)$/);
    expect(table(ours, undefined)).toContain(verdicts[0]);
  });

  test('the -TUNED and -FEW-ROWS rows get verdict lines too, and the table says what the tuned load changed', () => {
    const w = (ms: number) => ({ medianForwardMs: ms, medianWallMs: ms + 1, forwardMs: [ms], examplesPerSecond: 1 });
    const ours = {
      device: 'test', describe: 'made up', loadSeconds: 1, firstResultMs: 1,
      workloads: { 'RANK-3B-B32': w(46), 'RANK-3B-B32-TUNED': w(44), 'RANK-3B-B1': w(5), 'RANK-3B-B1-FEW-ROWS': w(4.5) },
      gemmTuning: 'GEMM tuning on (40 shapes timed, 9 on a cuBLASLt algorithm saving 0.400 ms per call of each)',
    } as unknown as RankBenchResult;
    const verdicts = defaultVerdicts(ours);
    expect(verdicts).toEqual([
      expect.stringMatching(/^CHANGE THE DEFAULT\? GEMM tuning \(RANK-3B-B32\): RANK-3B-B32-TUNED 44\.00 ms < RANK-3B-B32 46\.00 ms .*CudaOptions\.gemmTuning/),
      expect.stringMatching(/^CHANGE THE DEFAULT\? the few-row decoder linears at one example: RANK-3B-B1-FEW-ROWS 4\.50 ms < RANK-3B-B1 5\.00 ms .*CudaOptions\.fewRowLinears/),
    ]);
    expect(table(ours, undefined)).toContain("the -TUNED rows' load: GEMM tuning on (40 shapes timed, 9 on a cuBLASLt algorithm");
  });

  test('the table says when a variant load did not get its switch (its rows then time the default path)', () => {
    const w = (ms: number) => ({ medianForwardMs: ms, medianWallMs: ms + 1, forwardMs: [ms], examplesPerSecond: 1 });
    const ours = {
      device: 'test', describe: 'made up', loadSeconds: 1, firstResultMs: 1, workloads: { 'RANK-3B-B1': w(5) },
      variantDescribe: { pdl: 'cuda:0 X (cc 8.0, ...), programmatic dependent launch off (it needs compute capability 9.0), cuBLAS ...',
                         chunk1024: 'cuda:0 X, encoder in chunks of ~1024 rows, cuBLAS ...' },
    } as unknown as RankBenchResult;
    const lines = table(ours, undefined).split('\n').filter((l) => l.startsWith('NOTE:'));
    expect(lines).toEqual(['NOTE: the pdl load runs without programmatic dependent launch (programmatic dependent launch off (it needs ' +
      'compute capability 9.0)): its rows time the default path']);
  });

  test('the -PDL rows get verdict lines, against the default and against the few-row linears alone', () => {
    const w = (ms: number) => ({ medianForwardMs: ms, medianWallMs: ms + 1, forwardMs: [ms], examplesPerSecond: 1 });
    const ours = {
      device: 'test', describe: 'made up', loadSeconds: 1, firstResultMs: 1,
      workloads: { 'RANK-3B-B1': w(5), 'RANK-3B-B1-PDL': w(4.6), 'TRAIN-3B': w(43), 'TRAIN-3B-PDL': w(43.43),
                   'RANK-3B-B1-FEW-ROWS': w(4.5), 'RANK-3B-B1-FEW-ROWS-PDL': w(4) },
    } as unknown as RankBenchResult;
    expect(defaultVerdicts(ours)).toEqual([
      expect.stringMatching(/^CHANGE THE DEFAULT\? the few-row decoder linears at one example: RANK-3B-B1-FEW-ROWS 4\.50 ms < RANK-3B-B1 5\.00 ms/),
      expect.stringMatching(/^CHANGE THE DEFAULT\? programmatic dependent launch \(RANK-3B-B1\): RANK-3B-B1-PDL 4\.60 ms < RANK-3B-B1 5\.00 ms \(-8\.0 %; cuda_engine\.cc pdl_wanted \(CudaOptions\.programmaticLaunch\)\)$/),
      expect.stringMatching(/^default kept: programmatic dependent launch \(TRAIN-3B\) slower, TRAIN-3B-PDL 43\.43 ms vs TRAIN-3B 43\.00 ms \(\+1\.0 %\)$/),
      expect.stringMatching(/^CHANGE THE DEFAULT\? the few-row decoder linears with programmatic dependent launch at one example: RANK-3B-B1-FEW-ROWS-PDL 4\.00 ms < RANK-3B-B1 5\.00 ms/),
      expect.stringMatching(/^CHANGE THE DEFAULT\? programmatic dependent launch on top of the few-row decoder linears: RANK-3B-B1-FEW-ROWS-PDL 4\.00 ms < RANK-3B-B1-FEW-ROWS 4\.50 ms/),
    ]);
  });

  test('the best combination: every row that beat the default by over 1 %, fastest first, their switches merged', () => {
    const w = (ms: number) => ({ medianForwardMs: ms });
    const rows = [
      { row: 'RANK-3B-B1-PRECOMPUTED', cuda: { crossAttention: 'precomputed' as const } },
      { row: 'RANK-3B-B1-FEW-ROWS', cuda: { fewRowLinears: true } },
      { row: 'RANK-3B-B1-TUNED', cuda: { gemmTuning: true } },
      { row: 'RANK-3B-B1-PDL', cuda: { programmaticLaunch: true } },
      { row: 'RANK-3B-B1-PRECOMPUTED-FEW-ROWS', cuda: { fewRowLinears: true, crossAttention: 'precomputed' as const } },
    ];
    const workloads = {
      'RANK-3B-B1': w(5), 'RANK-3B-B1-PRECOMPUTED': w(5.2), 'RANK-3B-B1-FEW-ROWS': w(4.0), 'RANK-3B-B1-TUNED': w(4.97),
      'RANK-3B-B1-PDL': w(4.5), 'RANK-3B-B1-PRECOMPUTED-FEW-ROWS': w(3.8),
    };
    const best = bestCombination('RANK-3B-B1', workloads, rows)!;
    // TUNED is within 1 % (noise), PRECOMPUTED slower: neither is taken alone
    expect(best.winners.map((x) => x.row)).toEqual(['RANK-3B-B1-PRECOMPUTED-FEW-ROWS', 'RANK-3B-B1-FEW-ROWS', 'RANK-3B-B1-PDL']);
    expect(best.cuda).toEqual({ fewRowLinears: true, crossAttention: 'precomputed', programmaticLaunch: true });
    expect(best.row).toBe('RANK-3B-B1-BEST');
    // a combination one row measured already is not timed again, whether that row won or not
    expect(bestCombination('RANK-3B-B1', { ...workloads, 'RANK-3B-B1-PDL': w(5.1) }, rows)!.row).toBe('RANK-3B-B1-PRECOMPUTED-FEW-ROWS');
    const pdlRows = [...rows, { row: 'RANK-3B-B1-FEW-ROWS-PDL', cuda: { fewRowLinears: true, programmaticLaunch: true } }];
    const slowPair = { 'RANK-3B-B1': w(5), 'RANK-3B-B1-FEW-ROWS': w(4.0), 'RANK-3B-B1-PDL': w(4.5), 'RANK-3B-B1-FEW-ROWS-PDL': w(5.3) };
    expect(bestCombination('RANK-3B-B1', slowPair, pdlRows)!.row).toBe('RANK-3B-B1-FEW-ROWS-PDL');
    // a switch a faster winner sets otherwise is not taken from a slower one
    const chunks = [{ row: 'RANK-3B-B32-CHUNK1024', cuda: { encoderChunkRows: 1024 } }, { row: 'RANK-3B-B32-CHUNK2048', cuda: { encoderChunkRows: 2048 } }];
    const b32 = bestCombination('RANK-3B-B32', { 'RANK-3B-B32': w(46), 'RANK-3B-B32-CHUNK1024': w(44), 'RANK-3B-B32-CHUNK2048': w(42) }, chunks)!;
    expect(b32.cuda).toEqual({ encoderChunkRows: 2048 });
    expect(b32.row).toBe('RANK-3B-B32-CHUNK2048');
    // nor one that cannot run with the switches taken: the encoder chunks need the fused attention forward
    const withUnfused = [...chunks, { row: 'RANK-3B-B32-UNFUSED', cuda: { fusedAttention: false } }];
    expect(bestCombination('RANK-3B-B32', { 'RANK-3B-B32': w(46), 'RANK-3B-B32-CHUNK2048': w(42), 'RANK-3B-B32-UNFUSED': w(44) },
                           withUnfused)!.cuda).toEqual({ encoderChunkRows: 2048 });
    // nor the higher-occupancy attention kernels with the unfused attention, which has none (whichever came first)
    const occupancy = [{ row: 'TRAIN-3B-UNFUSED', cuda: { fusedAttention: false } }, { row: 'TRAIN-3B-OCCUPANCY', cuda: { attentionOccupancy: true } }];
    expect(bestCombination('TRAIN-3B', { 'TRAIN-3B': w(35), 'TRAIN-3B-UNFUSED': w(33), 'TRAIN-3B-OCCUPANCY': w(34) }, occupancy)!.cuda)
      .toEqual({ fusedAttention: false });
    expect(bestCombination('TRAIN-3B', { 'TRAIN-3B': w(35), 'TRAIN-3B-UNFUSED': w(34), 'TRAIN-3B-OCCUPANCY': w(33) }, occupancy)!.cuda)
      .toEqual({ attentionOccupancy: true });
    // nothing beat the default, or the default did not run: no combination
    expect(bestCombination('RANK-3B-B1', { 'RANK-3B-B1': w(3), 'RANK-3B-B1-FEW-ROWS': w(4) }, rows)).toBeUndefined();
    expect(bestCombination('TRAIN-3B', workloads, rows)).toBeUndefined();
  });

  test('the table gives each best combination against its default', () => {
    const w = (ms: number) => ({ medianForwardMs: ms, medianWallMs: ms + 1, forwardMs: [ms], examplesPerSecond: 1 });
    const ours = {
      device: 'test', describe: 'made up', loadSeconds: 1, firstResultMs: 1,
      workloads: { 'TRAIN-3B': w(43), 'TRAIN-3B-PDL': w(42), 'TRAIN-3B-TUNED': w(40), 'TRAIN-3B-BEST': w(38.7) },
      best: { 'TRAIN-3B': { winners: [{ row: 'TRAIN-3B-TUNED', ms: 40, cuda: { gemmTuning: true } }, { row: 'TRAIN-3B-PDL', ms: 42, cuda: { programmaticLaunch: true } }],
                            cuda: { gemmTuning: true, programmaticLaunch: true }, row: 'TRAIN-3B-BEST', describe: 'cuda: made up' } },
    } as unknown as RankBenchResult;
    expect(table(ours, undefined)).toContain('BEST TRAIN-3B: {"gemmTuning":true,"programmaticLaunch":true} -> TRAIN-3B-BEST 38.70 ms vs default ' +
      '43.00 ms (-10.0 %; faster alone: TRAIN-3B-TUNED 40.00, TRAIN-3B-PDL 42.00) | cuda: made up');
  });
});
