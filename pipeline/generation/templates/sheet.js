(function(){
  var KEY = "rebm-humaneval-" + document.body.dataset.sheet;
  var inputs = document.querySelectorAll("input[type=radio]");
  var total = document.querySelectorAll(".item").length;
  var rater = document.getElementById("rater");
  function answered(){ return document.querySelectorAll("input[type=radio]:checked"); }
  function save(){
    var state = {rater: rater.value, votes: {}};
    answered().forEach(function(i){ state.votes[i.name] = i.value; });
    try { localStorage.setItem(KEY, JSON.stringify(state)); } catch (e) {}
    document.getElementById("progress").textContent = answered().length + " / " + total + " answered";
  }
  try {
    var state = JSON.parse(localStorage.getItem(KEY) || "null");
    if (state) {
      rater.value = state.rater || "";
      Object.keys(state.votes).forEach(function(k){
        var el = document.querySelector("input[name='" + k + "'][value='" + state.votes[k] + "']");
        if (el) el.checked = true;
      });
    }
  } catch (e) {}
  inputs.forEach(function(i){ i.addEventListener("change", save); });
  rater.addEventListener("input", save);
  function q(s){ return '"' + String(s).replace(/"/g, '""') + '"'; }
  document.getElementById("download").addEventListener("click", function(){
    var id = rater.value.trim();
    if (!id) { alert("Please enter your rater id first."); rater.focus(); return; }
    var done = answered();
    if (done.length < total && !confirm((total - done.length) + " comparisons are unanswered. Download anyway?")) return;
    var lines = ["rater_id,pair_id,choice"];
    done.forEach(function(i){ lines.push([q(id), q(i.name), q(i.value)].join(",")); });
    var blob = new Blob([lines.join("\n") + "\n"], {type: "text/csv"});
    var a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = "votes-" + id.replace(/[^A-Za-z0-9_-]/g, "_") + ".csv";
    document.body.appendChild(a); a.click(); a.remove();
  });
  save();
})();
