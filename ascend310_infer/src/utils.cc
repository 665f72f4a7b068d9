#include "inc/utils.h"

#include <dirent.h>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>

namespace maskrcnn {
namespace {

bool IsFile(const std::string &path) {
  struct stat info {};
  return stat(path.c_str(), &info) == 0 && S_ISREG(info.st_mode);
}

bool IsDigits(const std::string &text) {
  return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

const char *kUsage =
    "usage: main --model_path=MODEL.mindir|MODEL.om --input_dir=PREPROCESSED [--result_dir=DIR] "
    "[--device_id=N] [--precision_mode=MODE]";

}  // namespace

Options ParseOptions(int argc, char **argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    std::string arg(argv[i]);
    size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      throw std::runtime_error("bad argument '" + arg + "'\n" + kUsage);
    }
    std::string key = arg.substr(2, eq - 2);
    std::string value = arg.substr(eq + 1);
    if (key == "model_path") {
      options.model_path = value;
    } else if (key == "input_dir") {
      options.input_dir = value;
    } else if (key == "result_dir") {
      options.result_dir = value;
    } else if (key == "device_id") {
      if (!IsDigits(value)) throw std::runtime_error("--device_id must be a non-negative integer, got '" + value + "'");
      options.device_id = static_cast<uint32_t>(std::strtoul(value.c_str(), nullptr, 10));
    } else if (key == "precision_mode") {
      options.precision_mode = value;
    } else {
      throw std::runtime_error("unknown option '--" + key + "'\n" + kUsage);
    }
  }
  if (options.model_path.empty() || options.input_dir.empty()) {
    throw std::runtime_error(std::string("--model_path and --input_dir are required\n") + kUsage);
  }
  if (!IsFile(options.model_path)) throw std::runtime_error("model '" + options.model_path + "' does not exist");
  return options;
}

std::string InputPath(const std::string &input_dir, const std::string &kind, const std::string &image_id) {
  return input_dir + "/" + kind + "/" + image_id + ".bin";
}

std::string OutputPath(const std::string &result_dir, const std::string &image_id, size_t output_index) {
  return result_dir + "/" + image_id + "_" + std::to_string(output_index) + ".bin";
}

std::vector<std::string> ListImageIds(const std::string &input_dir) {
  std::string shape_dir = input_dir + "/" + kImageShapeDir;
  DIR *dir = opendir(shape_dir.c_str());
  if (dir == nullptr) throw std::runtime_error("cannot open '" + shape_dir + "'; run preprocess.py first");
  std::vector<std::string> ids;
  for (dirent *entry = readdir(dir); entry != nullptr; entry = readdir(dir)) {
    std::string name(entry->d_name);
    const std::string suffix = ".bin";
    if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    std::string stem = name.substr(0, name.size() - suffix.size());
    if (!IsDigits(stem)) {
      closedir(dir);
      throw std::runtime_error("'" + shape_dir + "/" + name + "': file names must be <image_id>.bin");
    }
    ids.push_back(stem);
  }
  closedir(dir);
  if (ids.empty()) throw std::runtime_error("no <image_id>.bin files in '" + shape_dir + "'");
  std::sort(ids.begin(), ids.end(), [](const std::string &a, const std::string &b) {
    return a.size() != b.size() ? a.size() < b.size() : a < b;
  });
  for (const auto &id : ids) {
    if (!IsFile(InputPath(input_dir, kImageDir, id))) {
      throw std::runtime_error("'" + InputPath(input_dir, kImageDir, id) + "' is missing (its image_shape file exists)");
    }
  }
  return ids;
}

std::vector<char> ReadFile(const std::string &path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open '" + path + "'");
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void EnsureDirectory(const std::string &path) {
  struct stat info {};
  if (stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode)) return;
  if (mkdir(path.c_str(), 0755) != 0 && errno != EEXIST) {
    throw std::runtime_error("cannot create directory '" + path + "': " + std::strerror(errno));
  }
}

void WriteFileAtomic(const std::string &path, const std::vector<char> &data) {
  std::string tmp = path + ".tmp";
  FILE *out = std::fopen(tmp.c_str(), "wb");
  if (out == nullptr) throw std::runtime_error("cannot write '" + tmp + "': " + std::strerror(errno));
  size_t written = data.empty() ? 0 : std::fwrite(data.data(), 1, data.size(), out);
  bool ok = written == data.size() && std::fflush(out) == 0;
  ok = (std::fclose(out) == 0) && ok;
  if (!ok || std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    throw std::runtime_error("cannot write '" + path + "': " + std::strerror(errno));
  }
}

std::vector<char> KeepRows(const char *data, size_t rows, size_t row_bytes, const uint8_t *valid) {
  std::vector<char> kept;
  for (size_t r = 0; r < rows; ++r) {
    if (valid[r] != 0) kept.insert(kept.end(), data + r * row_bytes, data + (r + 1) * row_bytes);
  }
  return kept;
}

}  // namespace maskrcnn
