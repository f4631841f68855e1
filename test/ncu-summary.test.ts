// benchmarks/ncu-summary.ts: Nsight Compute's CSV (as device-check.sh's ncu step writes it: the profiled script's own
// lines, then one row per kernel launch and metric) summed per kernel and grid.
import { ncuTable, parseNcuLog, shortKernelName, summariseNcu } from '../benchmarks/ncu-summary';

const header = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC",' +
  '"Section Name","Metric Name","Metric Unit","Metric Value","Rule Name","Rule Type","Rule Description","Estimated Speedup Type","Estimated Speedup"';

function row(id: number, kernel: string, grid: string, metric: string, unit: string, value: string): string {
  return [String(id), '1631', 'node', '127.0.0.1', kernel, '1', '13', '(256, 1, 1)', grid, '0', '9.0', 'Section', metric, unit, value, '', '', '', '', '']
    .map((f) => `"${f.replace(/"/g, '""')}"`).join(',');
}

describe('ncu-summary', () => {
  const norm = 'void unnamed>::rmsnorm_forward_warp_kernel<16, 1, float, __nv_bfloat16>(const T3 *, const float *, long, int, float, float, T4 *)';
  const attn = 'void <unnamed>::fused_encoder_attention_mma_kernel<64>(const __nv_bfloat16 *, int, int, KeepBits)';
  const log = [
    '==PROF== Connected to process 1631 (/tmp/devnode/node)',
    '[kernel-profile] a line of the profiled script, with "quotes", and commas',
    header,
    row(0, norm, '(1024, 1, 1)', 'Duration', 'ns', '38,976'),
    row(0, norm, '(1024, 1, 1)', 'DRAM Throughput', '%', '71.25'),
    row(0, norm, '(1024, 1, 1)', 'Registers Per Thread', 'register/thread', '36'),
    row(1, attn, '(4, 32, 8)', 'Duration', 'us', '111.5'),
    row(1, attn, '(4, 32, 8)', 'Achieved Occupancy', '%', '16.5'),
    row(2, norm, '(1024, 1, 1)', 'Duration', 'ns', '41,024'),
    row(2, norm, '(1024, 1, 1)', 'DRAM Throughput', '%', '72.75'),
    row(3, norm, '(128, 1, 1)', 'Duration', 'ns', '5,300'),
    '==PROF== Disconnected from process 1631',
  ].join('\n');

  test('kernel names lose their argument lists and anonymous namespaces, not their template arguments', () => {
    expect(shortKernelName(norm)).toBe('rmsnorm_forward_warp_kernel<16, 1, float, __nv_bfloat16>');
    expect(shortKernelName(attn)).toBe('fused_encoder_attention_mma_kernel<64>');
    expect(shortKernelName('void (anonymous namespace)::k<a<b>, 2>(int)')).toBe('k<a<b>, 2>');
    expect(shortKernelName('cutlass::Kernel2<cutlass_80_tensorop>(Params)')).toBe('cutlass::Kernel2<cutlass_80_tensorop>');
  });

  test('launches summed per kernel and grid, durations in us whatever the unit, longest total first', () => {
    const launches = parseNcuLog(log);
    expect(launches).toHaveLength(4);
    const s = summariseNcu(launches);
    expect(s.map((k) => [k.kernel, k.grid, k.launches])).toEqual([
      ['fused_encoder_attention_mma_kernel<64>', '(4, 32, 8)', 1],
      ['rmsnorm_forward_warp_kernel<16, 1, float, __nv_bfloat16>', '(1024, 1, 1)', 2],
      ['rmsnorm_forward_warp_kernel<16, 1, float, __nv_bfloat16>', '(128, 1, 1)', 1],
    ]);
    expect(s[0].totalUs).toBeCloseTo(111.5, 6);
    expect(s[0].achievedOccupancyPct).toBeCloseTo(16.5, 6);
    expect(s[1].totalUs).toBeCloseTo(80.0, 6);  // 38.976 + 41.024
    expect(s[1].meanUs).toBeCloseTo(40.0, 6);
    expect(s[1].dramPct).toBeCloseTo(72.0, 6);
    expect(s[1].registers).toBe(36);
    expect(Number.isNaN(s[2].dramPct)).toBe(true);  // (no such metric for that launch)
    const table = ncuTable(s, 2).split('\n');
    expect(table).toHaveLength(4);  // header, rule, the top 2
    expect(table[2]).toMatch(/^\| fused_encoder_attention_mma_kernel<64> \| \(4, 32, 8\) x \(256, 1, 1\) \| 1 \| 111\.5 \| 111\.5 \| - \| - \| 16\.5 \/ - \| - \| - \|$/);
  });

  test('a log without ncu rows gives no launches', () => {
    expect(parseNcuLog('==PROF== nothing profiled\n')).toEqual([]);
  });
});
