#include "mapped_file.h"

#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>
#include <sstream>

#include "core/errors.h"

namespace tfew {

MappedFile::MappedFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(ErrorCode::Io, "cannot open " + path + ": " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    ::close(fd);
    fail(ErrorCode::Io, "cannot stat " + path);
  }
  size_ = st.st_size;
  if (size_ > 0) {
    void* p = mmap(nullptr, static_cast<size_t>(size_), PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(ErrorCode::Io, "cannot mmap " + path + ": " + std::strerror(errno));
    }
    data_ = static_cast<uint8_t*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_) munmap(data_, static_cast<size_t>(size_));
}

namespace {

// Set while this thread runs a guarded read. g_active_guards lets the handler leave the thread-local alone (its
// first access on a thread may allocate, which a signal handler must not) unless some guarded read is running.
// (initial-exec TLS would avoid that, but a dlopen'ed addon beside the CUDA libraries may find no static TLS.)
thread_local sigjmp_buf* t_guarded_read = nullptr;
std::atomic<int> g_active_guards{0};
struct sigaction g_previous_sigbus;
std::once_flag g_sigbus_installed;

void on_sigbus(int sig, siginfo_t* info, void* ucontext) {
  if (g_active_guards.load(std::memory_order_relaxed) > 0 && t_guarded_read) siglongjmp(*t_guarded_read, 1);
  // Not ours: what handled SIGBUS before. A fault (si_code > 0) that was ignored or defaulted gets the default
  // action (returning would repeat the faulting access forever); a sent SIGBUS is raised again by default.
  const struct sigaction& prev = g_previous_sigbus;
  const bool fault = info != nullptr && info->si_code > 0;
  if (prev.sa_flags & SA_SIGINFO) {
    if (prev.sa_sigaction) return prev.sa_sigaction(sig, info, ucontext);
  } else if (prev.sa_handler == SIG_IGN) {
    if (!fault) return;
  } else if (prev.sa_handler != SIG_DFL && prev.sa_handler != nullptr) {
    return prev.sa_handler(sig);
  }
  signal(SIGBUS, SIG_DFL);
  if (!fault) raise(SIGBUS);  // (a fault repeats on return and ends the process as it would have without us)
}

}  // namespace

void guarded_read(const std::string& what, void (*copy)(void*), void* context) {
  std::call_once(g_sigbus_installed, [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigbus;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGBUS, &sa, &g_previous_sigbus);
  });
  sigjmp_buf jump;
  sigjmp_buf* const outer = t_guarded_read;
  if (sigsetjmp(jump, 1) != 0) {  // (the signal mask is restored: SIGBUS is deliverable again)
    t_guarded_read = outer;
    g_active_guards.fetch_sub(1);
    fail(ErrorCode::Io, "reading " + what + " failed with a bus error: the file was truncated or replaced while " +
                            "it was being loaded");
  }
  t_guarded_read = &jump;
  g_active_guards.fetch_add(1);
  try {
    copy(context);
  } catch (...) {  // (no callers throw today; a stale jump buffer must not outlive this frame)
    t_guarded_read = outer;
    g_active_guards.fetch_sub(1);
    throw;
  }
  t_guarded_read = outer;
  g_active_guards.fetch_sub(1);
}

void read_after_truncation_for_test() {
  const char* tmp = std::getenv("TMPDIR");
  std::string name = std::string(tmp && tmp[0] ? tmp : "/tmp") + "/tfew-truncation-test-XXXXXX";
  std::vector<char> path(name.begin(), name.end());
  path.push_back('\0');
  const int fd = mkstemp(path.data());
  if (fd < 0) fail(ErrorCode::Io, std::string("cannot create a temporary file: ") + std::strerror(errno));
  struct Cleanup {
    const char* path;
    int fd;
    ~Cleanup() {
      ::close(fd);
      ::unlink(path);
    }
  } cleanup{path.data(), fd};
  std::vector<uint8_t> bytes(1 << 16, 7);
  if (::write(fd, bytes.data(), bytes.size()) != static_cast<ssize_t>(bytes.size()))
    fail(ErrorCode::Io, std::string("cannot write ") + path.data());
  MappedFile file(path.data());
  if (::ftruncate(fd, 0) != 0) fail(ErrorCode::Io, std::string("cannot truncate ") + path.data());
  volatile uint8_t sink = 0;
  read_mapped(std::string("the test file ") + path.data(), [&] { sink = file.data()[0]; });
  (void)sink;
}

DType parse_dtype(const std::string& s) {
  if (s == "F64") return DType::F64;
  if (s == "F32") return DType::F32;
  if (s == "F16") return DType::F16;
  if (s == "BF16") return DType::BF16;
  fail(ErrorCode::InvalidModel, "unsupported dtype " + s);
}

int dtype_size(DType d) {
  switch (d) {
    case DType::F64: return 8;
    case DType::F32: return 4;
    default: return 2;
  }
}

static std::string shape_str(const std::vector<int64_t>& s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

FileWeightSource::FileWeightSource(const std::vector<TensorSpec>& specs) {
  for (const auto& s : specs) {
    specs_[s.name] = s;
    if (!files_.count(s.file)) files_[s.file] = std::make_shared<MappedFile>(s.file);
  }
}

bool FileWeightSource::has(const std::string& name) const { return specs_.count(name) > 0; }

TensorView FileWeightSource::get(const std::string& name, const std::vector<int64_t>& expected) const {
  auto it = specs_.find(name);
  if (it == specs_.end()) fail(ErrorCode::InvalidModel, "checkpoint has no tensor " + name);
  const TensorSpec& s = it->second;
  // A [n] tensor may be stored as [n] or [n, 1] etc.; compare element counts and the non-unit dims.
  std::vector<int64_t> a, b;
  for (auto d : s.shape) if (d != 1) a.push_back(d);
  for (auto d : expected) if (d != 1) b.push_back(d);
  if (a != b)
    fail(ErrorCode::InvalidModel, "tensor " + name + " in " + s.file + " has shape " + shape_str(s.shape) +
                                      ", expected " + shape_str(expected));
  const auto& f = files_.at(s.file);
  int64_t numel = 1;
  for (auto d : s.shape) numel *= d;  // no overflow: the non-unit dims equal the engine's expected shape
  if (s.byte_length != numel * dtype_size(s.dtype))
    fail(ErrorCode::InvalidModel, "tensor " + name + " in " + s.file + ": byte length does not match its shape and dtype");
  // Written so that no sum can overflow (offset and length come from a file header).
  if (s.offset < 0 || s.byte_length < 0 || s.byte_length > f->size() || s.offset > f->size() - s.byte_length)
    fail(ErrorCode::Io, "tensor " + name + " lies beyond the end of " + s.file + " (truncated file?)");
  TensorView v;
  v.name = name;
  v.dtype = s.dtype;
  v.shape = s.shape;
  v.data = f->data() + s.offset;
  return v;
}

static float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

static float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) { mant <<= 1; --exp; }
      mant &= 0x3ff;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void convert_to_f32(const TensorView& t, int64_t start, int64_t n, float* out) {
  const uint8_t* p = static_cast<const uint8_t*>(t.data);
  switch (t.dtype) {
    case DType::F32:
      std::memcpy(out, p + start * 4, static_cast<size_t>(n) * 4);
      break;
    case DType::F64:
      for (int64_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, p + (start + i) * 8, 8);
        out[i] = static_cast<float>(d);
      }
      break;
    case DType::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + (start + i) * 2, 2);
        out[i] = f16_to_f32(h);
      }
      break;
    case DType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, p + (start + i) * 2, 2);
        out[i] = bf16_to_f32(h);
      }
      break;
  }
}

}  // namespace tfew
